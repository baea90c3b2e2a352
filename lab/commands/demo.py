"""``smtplab demo [LESSON]``: narrated lessons (docs/classroom.md), each step a CLI change, a run drawn as a
ladder, its mail log and what to notice. Exit 0 when every step's verdict is what its lesson expects, 1
otherwise, 3 for a bad lesson file or an unknown lesson."""

from __future__ import annotations

import argparse
import contextlib
import sys

from lab.demo import Lesson, Teacher, builtin_lessons, load_lesson
from lab.errors import BadInput
from lab.report.terminal import make_console

HELP = "narrated lessons for a classroom: CLI change, ladder diagram, mail log, what to notice (docs/classroom.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lesson", metavar="LESSON", nargs="?", help="one built-in lesson by id (default: all)")
    parser.add_argument("--list", action="store_true", help="list the lessons and exit")
    parser.add_argument(
        "--no-pause",
        action="store_true",
        help="do not wait for Enter between steps (for CI; also when stdin is not a terminal)",
    )
    parser.add_argument(
        "--lesson-file", metavar="FILE", action="append", default=[], help="run a lesson from FILE (repeatable)"
    )
    parser.add_argument(
        "--log",
        metavar="FILE",
        help="write the mail log of the lessons' lab days to FILE (for smtplab track and smtplab tls-report)",
    )


def _chosen(args: argparse.Namespace) -> list[Lesson]:
    if args.lesson_file:
        if args.lesson:
            raise BadInput("give a LESSON id or --lesson-file, not both", field="LESSON")
        return [load_lesson(path) for path in args.lesson_file]
    lessons = builtin_lessons()
    if args.lesson is None:
        return lessons
    found = [lesson for lesson in lessons if lesson.id == args.lesson]
    if not found:
        known = ", ".join(lesson.id for lesson in lessons)
        raise BadInput(f"no lesson {args.lesson!r} (the lessons: {known})", field="LESSON")
    return found


def _enter() -> None:
    with contextlib.suppress(EOFError):
        input("[Enter] for the next step ")


def run(args: argparse.Namespace) -> int:
    lessons = _chosen(args)
    if args.list:
        for lesson in lessons:
            print(f"{lesson.id:<28} {lesson.title} ({len(lesson.steps)} steps)")
        return 0
    pause = not args.no_pause and sys.stdin.isatty()
    with contextlib.ExitStack() as stack:
        log = None
        if args.log:
            try:
                log = stack.enter_context(open(args.log, "w", encoding="utf-8"))
            except OSError as exc:
                raise BadInput(f"cannot write the mail log: {exc.strerror or exc}", file=args.log) from None
        teacher = Teacher(make_console(), _enter if pause else lambda: None, log)
        results = [teacher.lesson(lesson) for lesson in lessons]
    bad = [lesson.id for lesson, good in zip(lessons, results, strict=True) if not good]
    named = f" ({', '.join(bad)})" if bad else ""
    teacher.say(f"lessons: {len(lessons) - len(bad)} as expected, {len(bad)} not{named}")
    return 1 if bad else 0
