"""Django's message middleware, with the storage made when a request first uses it.

Django's MessageMiddleware builds the cookie and session storages (and a cookie signer) for
every request; API requests never use them. Here request._messages is a lazy object that
builds them on first use (adding a message, or a template listing them), and the response
saves them only then, so a request that never touched messages pays nothing.
"""

from django.contrib.messages.middleware import MessageMiddleware
from django.contrib.messages.storage import default_storage
from django.utils.functional import SimpleLazyObject, empty

__all__ = ["LazyMessageMiddleware"]


class LazyMessageMiddleware(MessageMiddleware):
    def process_request(self, request):
        request._messages = SimpleLazyObject(lambda: default_storage(request))

    def process_response(self, request, response):
        messages = getattr(request, "_messages", None)
        if isinstance(messages, SimpleLazyObject) and messages._wrapped is empty:
            return response  # never used: nothing to store
        return super().process_response(request, response)
