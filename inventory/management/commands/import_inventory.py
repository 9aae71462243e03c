from argparse import RawDescriptionHelpFormatter
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from config.errors import ValidationFailed
from inventory import importer


class Command(BaseCommand):
    help = (
        "Create or update GPU models, sites, nodes and GPUs from a YAML or CSV file (chosen by "
        "extension). The whole file is validated first: every bad row is reported with its line "
        "number and nothing is written. Importing the same file again changes nothing. Examples: "
        "inventory/fixtures/example_inventory.yaml and .csv. The format:\n\n"
        + (importer.__doc__ or "")
    )

    def create_parser(self, prog_name, subcommand, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.formatter_class = RawDescriptionHelpFormatter
        return parser

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path, help="a .yaml, .yml or .csv inventory file")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="validate and report what would change, then roll back",
        )

    def handle(self, *args, file: Path, dry_run: bool, **options):
        try:
            report = importer.inventory_import(path=file, dry_run=dry_run)
        except ValidationFailed as exc:
            raise CommandError(exc.message) from None
        verb = "Would import" if dry_run else "Imported"
        self.stdout.write(self.style.SUCCESS(f"{verb} {file}: {report.summary()}"))
