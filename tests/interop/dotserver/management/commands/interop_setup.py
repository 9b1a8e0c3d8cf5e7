"""Creates the tables (`migrate`; settings.MIGRATION_MODULES makes them from the models),
then registers the two applications the interop test uses:

- bearerd's client: confidential, client-credentials grant; it may ask for the scopes in
  OAUTH2_PROVIDER["SCOPES"] (read, write). Its secret is stored hashed, as DOT 2+ does by
  default (the plaintext goes to the model, which hashes it when saved).
- the resource server's client: confidential; the test upstream authenticates as it with
  HTTP Basic to call the introspection endpoint (/o/introspect/, RFC 7662). Its secret is
  stored unhashed (hash_client_secret=False) so that each introspection does not spend a
  password hash's worth of CPU: the upstream introspects every request it gets.

Ids and secrets come from the options, or else from the environment variables named in
their help. With BEARERD_INTEROP_REFRESH_TOKEN set, bearerd's client also gets a user's
access and refresh tokens, the refresh token being that value: the state after a user
authorised the client once (the refresh-token grant test starts from it).
"""

import os

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.utils import timezone
from oauth2_provider.models import (
    get_access_token_model,
    get_application_model,
    get_refresh_token_model,
)


def _from_env(name):
    return {"default": os.environ.get(name), "help": f"default: ${name}"}


class Command(BaseCommand):
    help = "Create the tables, bearerd's client-credentials application and the resource server's."

    def add_arguments(self, parser):
        parser.add_argument("--client-id", **_from_env("BEARERD_INTEROP_CLIENT_ID"))
        parser.add_argument("--client-secret", **_from_env("BEARERD_INTEROP_CLIENT_SECRET"))
        parser.add_argument("--resource-server-id", **_from_env("BEARERD_INTEROP_RS_CLIENT_ID"))
        parser.add_argument(
            "--resource-server-secret", **_from_env("BEARERD_INTEROP_RS_CLIENT_SECRET")
        )

    def handle(self, *args, **options):
        for option in ("client_id", "client_secret", "resource_server_id", "resource_server_secret"):
            if not options[option]:
                raise CommandError(f"--{option.replace('_', '-')} is required")
        call_command("migrate", interactive=False, run_syncdb=True, verbosity=0)
        Application = get_application_model()
        Application.objects.filter(
            client_id__in=[options["client_id"], options["resource_server_id"]]
        ).delete()
        bearerd = Application.objects.create(
            name="bearerd",
            client_id=options["client_id"],
            client_secret=options["client_secret"],
            client_type=Application.CLIENT_CONFIDENTIAL,
            authorization_grant_type=Application.GRANT_CLIENT_CREDENTIALS,
        )
        Application.objects.create(
            name="resource server",
            client_id=options["resource_server_id"],
            client_secret=options["resource_server_secret"],
            hash_client_secret=False,
            client_type=Application.CLIENT_CONFIDENTIAL,
            authorization_grant_type=Application.GRANT_CLIENT_CREDENTIALS,
        )
        refresh_token = os.environ.get("BEARERD_INTEROP_REFRESH_TOKEN")
        if refresh_token:
            user, _ = get_user_model().objects.get_or_create(username="interop-user")
            access = get_access_token_model().objects.create(
                user=user,
                application=bearerd,
                token="interop-first-access-token",
                expires=timezone.now() + timedelta(hours=1),
                scope="read write",
            )
            get_refresh_token_model().objects.create(
                user=user, application=bearerd, token=refresh_token, access_token=access
            )
        self.stdout.write(
            f"applications: {options['client_id']!r} (bearerd), "
            f"{options['resource_server_id']!r} (resource server)"
        )
