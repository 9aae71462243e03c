from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from inventory import grid_prices


class Command(BaseCommand):
    help = (
        "Load power prices per zone from a CSV file with the header "
        "zone,starts_at,ends_at,price_per_mwh,currency (times ISO 8601 with a UTC offset; "
        "currency may be empty: the zone's). The whole file is checked first: every bad row is "
        "reported with its line and nothing is written. Loading the same file again changes "
        "nothing; a new price for a stored interval replaces it (docs/grid.md)."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path, help="the CSV file")
        parser.add_argument(
            "--dry-run", action="store_true", help="check and report, then write nothing"
        )

    def handle(self, *args, file: Path, dry_run: bool, **options):
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise CommandError(f"Cannot read {file}: {exc.strerror}.") from None
        try:
            result = grid_prices.zone_prices_csv_load(
                data=data, source=f"csv:{file.name}", dry_run=dry_run
            )
        except grid_prices.PricesRefused as exc:
            lines = "\n".join(f"  {p}" for p in exc.problems)
            raise CommandError(
                f"{len(exc.problems)} problem(s) in {file}; nothing was written:\n{lines}"
            ) from None
        verb = "Checked (nothing written)" if dry_run else "Loaded"
        self.stdout.write(self.style.SUCCESS(f"{verb} {file}: {result.summary()}."))
        for zone, start, end in result.gaps:
            self.stdout.write(f"  gap in {zone}: {start.isoformat()} to {end.isoformat()}")
