"""Counts the requests that reach the token endpoint, by the status they were answered with,
so that the test can tell how many token requests bearerd sent."""

import threading
from collections import Counter

TOKEN_PATH = "/o/token/"

_lock = threading.Lock()
_token_requests = Counter()


def count_token_requests(get_response):
    def middleware(request):
        response = get_response(request)
        if request.path == TOKEN_PATH:
            with _lock:
                _token_requests[str(response.status_code)] += 1
        return response

    return middleware


def token_requests():
    """{status: count} of the requests to the token endpoint so far."""
    with _lock:
        return dict(_token_requests)
