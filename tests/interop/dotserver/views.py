"""What the test asks the server besides OAuth: how many token requests it answered, and how
many access tokens it holds."""

from django.http import JsonResponse
from oauth2_provider.models import get_access_token_model

from .middleware import token_requests


def stats(request):
    return JsonResponse(
        {
            "token_requests": token_requests(),
            "access_tokens": get_access_token_model().objects.count(),
        }
    )
