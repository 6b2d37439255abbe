"""factory_boy factories for rows that need no service logic."""

from __future__ import annotations

import factory
from factory.django import DjangoModelFactory

from tenants.models import Membership, Plan, Tenant, User


class UserFactory(DjangoModelFactory[User]):
    class Meta:
        model = User
        django_get_or_create = ("email",)

    email = factory.Sequence(lambda n: f"user{n}@example.test")
    name = factory.Faker("name")
    password = factory.django.Password("correct horse battery staple")


class PlanFactory(DjangoModelFactory[Plan]):
    class Meta:
        model = Plan
        django_get_or_create = ("code",)

    code = factory.Sequence(lambda n: f"plan-{n}")
    name = factory.LazyAttribute(lambda o: o.code.title())
    monthly_fee = 10


class MembershipFactory(DjangoModelFactory[Membership]):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    role = "viewer"


def member_add(*, tenant: Tenant, email: str, role: str, password: str | None = None) -> Membership:
    """A user with ``email`` made a member of ``tenant`` with ``role`` (fixtures only: real
    members join through invitations)."""
    user = UserFactory(email=email, **({"password": factory.django.Password(password)} if password else {}))
    if password:
        user.set_password(password)
        user.save()
    return MembershipFactory(user=user, tenant=tenant, role=role)
