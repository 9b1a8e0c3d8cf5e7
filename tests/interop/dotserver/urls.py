"""DOT's endpoints under /o/ (token, revoke_token, introspect, ...), as its docs mount them,
and /interop/stats/ for the test."""

from django.urls import include, path

from . import views

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("interop/stats/", views.stats),
]
