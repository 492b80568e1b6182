"""`chattune data convert IN OUT --to FORMAT`: records of one layout and file type -> another.

Every record goes through the same loader training uses, so a record that converts is
a record that trains; the others are listed, with their location and reason, in OUT's
`.rejects.jsonl` neighbour. The conversion itself is data/convert.py.
"""

from __future__ import annotations

from pathlib import Path

from chattune.data.convert import (ConvertReport, RejectLog, check_paths, convert_records, parse_map, rejects_path,
                                   write_records)
from chattune.data.formats import FORMATS
from chattune.data.stream import iter_records
from chattune.errors import ConfigError, DataError

SHOWN_REJECTS = 10


def run(src: str | Path, out: str | Path, *, to: str, instruction: str | None = None, mapping: str | None = None,
        system: str | None = None, instruction_as: str = "user", source_format: str = "auto",
        overwrite: bool = False) -> ConvertReport:
    """Convert every record of SRC to the `to` layout in OUT (.json, .jsonl or .parquet); print and return the counts."""
    src, out = Path(src), Path(out)
    renames = parse_map(mapping)
    check_paths(src, out, overwrite=overwrite)
    if to not in FORMATS:
        raise ConfigError(f"unknown target format {to!r}", where="--to", fix=f"use one of {', '.join(FORMATS)}")
    report = ConvertReport(out=out, to=to)
    rejects = RejectLog(rejects_path(out))
    records = convert_records(iter_records(src), to=to, instruction=instruction, renames=renames, system=system,
                              instruction_as=instruction_as, source_format=source_format, report=report,
                              rejects=rejects)
    try:
        report.written = write_records(out, records, to=to)
    finally:
        rejects.close()
    report.rejects_file = rejects.path if rejects.count else None
    if report.written == 0:
        out.unlink(missing_ok=True)
        raise DataError(f"no record could be converted ({len(report.rejected)} rejected)", where=str(src),
                        fix=_no_records_fix(report))
    show(report, src)
    return report


def show(report: ConvertReport, src: Path) -> None:
    """Counts, the first rejects, and where the rest are."""
    fmts = ", ".join(report.source_formats) or "none"
    print(f"read {report.read} records from {src}; wrote {report.written} {report.to} records (from {fmts}) to {report.out}")
    if report.kept_own_instruction:
        print(f"{report.kept_own_instruction} record(s) kept their own instruction (--instruction fills only empty ones)")
    if report.rejected:
        print(f"rejected {len(report.rejected)} record(s), all listed with the reason in {report.rejects_file}:")
        for where, reason in report.rejected[:SHOWN_REJECTS]:
            print(f"  {where}: {reason}")
        if len(report.rejected) > SHOWN_REJECTS:
            print(f"  ... and {len(report.rejected) - SHOWN_REJECTS} more")


def _no_records_fix(report: ConvertReport) -> str:
    if report.rejected:
        where, reason = report.rejected[0]
        return (f"the first: {where}: {reason}; rename columns with --map NEW=OLD (e.g. --map input=question,output=answer) "
                "or give --from")
    return "the input has no records"
