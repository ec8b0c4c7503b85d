"""Operator commands: `python -m service.admin create-key --tenant NAME`, `list-keys`, `revoke-key`."""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import select

from service.auth import create_key, revoke_key
from service.database import make_engine, make_session_factory, transaction
from service.errors import NotFound
from service.settings import get_settings
from service.tables import ApiKey


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.admin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-key", help="Make a key for a tenant; prints it once, on the last line.")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="", help="A label, e.g. who or what uses the key.")
    listing = sub.add_parser("list-keys", help="List keys (prefix, tenant, name, created, revoked).")
    listing.add_argument("--tenant")
    revoke = sub.add_parser("revoke-key", help="Revoke a key by its prefix (qaas_xxxxxxxx) or id.")
    revoke.add_argument("key")
    args = parser.parse_args(argv)

    engine = make_engine(get_settings())
    factory = make_session_factory(engine)
    try:
        with transaction(factory) as session:
            if args.command == "create-key":
                tenant = args.tenant.strip()
                if not tenant or len(tenant) > 64:
                    parser.error("--tenant must be 1 to 64 characters")
                new = create_key(session, tenant, args.name)
                print(f"Created key {new.row.prefix} for tenant {tenant!r}. It is shown once; store it now:")
                print(new.key)
            elif args.command == "list-keys":
                query = select(ApiKey).order_by(ApiKey.created_at)
                if args.tenant:
                    query = query.where(ApiKey.tenant == args.tenant)
                print("prefix\ttenant\tname\tcreated_at\trevoked_at")
                for row in session.scalars(query):
                    revoked = row.revoked_at.isoformat() if row.revoked_at else "-"
                    print(f"{row.prefix}\t{row.tenant}\t{row.name}\t{row.created_at.isoformat()}\t{revoked}")
            else:
                try:
                    row = revoke_key(session, args.key)
                except NotFound:
                    print(f"No API key {args.key!r}.", file=sys.stderr)
                    return 1
                print(f"Revoked {row.prefix} (tenant {row.tenant!r}).")
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
