"""The command line of main.py: absl flags made from the configuration's fields (config.py
writes each field's type, default, help and choices once), flagfiles with the earlier port's
list semantics, --help by section, and the Config of the parsed flags.
"""
import os
import sys
import textwrap
import typing

from absl import flags

import config
import distributed
import files
from errors import UserError

FLAGS = flags.FLAGS
LEGACY_TITLE = "Accepted for the earlier port's flagfiles"


def define_flag(item, kind):
    """The absl flag of one configuration field, from its type, default, help and choices."""
    name, default, help_text = item.name, item.default, item.metadata["help"]
    if item.metadata["choices"]:
        flags.DEFINE_enum(name, default, list(item.metadata["choices"]), help_text)
    elif kind in (bool, typing.Optional[bool]):
        flags.DEFINE_bool(name, default, help_text)
    elif kind is int:
        flags.DEFINE_integer(name, default, help_text)
    elif kind is float:
        flags.DEFINE_float(name, default, help_text)
    elif name in config.MULTI_FLAGS:
        flags.DEFINE_multi_integer(name, list(default), help_text)
    elif kind == tuple[str, ...]:
        flags.DEFINE_list(name, list(default), help_text)
    else:
        flags.DEFINE_string(name, default, help_text)


for _section in config.SECTIONS.values():
    for _item in config.dataclasses.fields(_section):
        define_flag(_item, config.field_types(_section)[_item.name])
flags.DEFINE_bool("parallel", None, "accepted for the earlier port's flagfiles and ignored: "
                  "processes are set with --nprocs")
flags.DEFINE_bool("fid_use_torch", False, "accepted for the seed's flagfiles; the Frechet "
                  "distance is always the exact float64 one, on the evaluation device")
LEGACY_FLAGS = ("parallel", "fid_use_torch")


def list_flags_from_last_source(argv):
    """absl appends every occurrence of a multi-valued flag, so `--flagfile f --ch_mult 1`
    would extend f's list instead of replacing it. Here the last source that names a list
    flag (a flagfile, or the command line after it) replaces what came before."""
    args = []
    for arg in argv[1:]:  # "--flagfile PATH" -> "--flagfile=PATH"
        if args and args[-1] in ("--flagfile", "-flagfile"):
            args[-1] = f"--flagfile={arg}"
        else:
            args.append(arg)
    segments, command_line = [], []
    for arg in args:
        if arg.startswith(("--flagfile=", "-flagfile=")):
            segments += [command_line, read_flagfile_args(arg.partition("=")[2])]
            command_line = []
        else:
            command_line.append(arg)
    segments.append(command_line)

    def names(segment):
        return {arg.lstrip("-").split("=")[0] for arg in segment if arg.startswith("-")}

    kept = []
    for index, segment in enumerate(segments):
        later = set().union(*map(names, segments[index + 1:]))
        skip_value = False
        for arg in segment:
            if skip_value:
                skip_value = False
                continue
            name = arg.lstrip("-").split("=")[0] if arg.startswith("-") else None
            if name in config.MULTI_FLAGS and name in later:
                skip_value = "=" not in arg
                continue
            kept.append(arg)
    return [argv[0]] + kept


def read_flagfile_args(path):
    """A flagfile's arguments, as absl reads them; a file that is not UTF-8 text, or not a
    regular file (a FIFO would block absl's read, /dev/zero never end it), is one line."""
    if os.path.lexists(path):
        files.read_text(path)
    return FLAGS.read_flags_from_files([f"--flagfile={path}"], force_gnu=False)


def print_help(doc):
    """--help: what the program does (doc), its common commands, then the flags by section."""
    print(doc)
    groups = [(section.TITLE, [item.name for item in config.dataclasses.fields(section)])
              for section in config.SECTIONS.values()] + [(LEGACY_TITLE, list(LEGACY_FLAGS))]
    for title, names in groups:
        print(f"{title}:")
        for name in names:
            flag = FLAGS[name]
            default = "" if flag.default is None else f" (default: {flag.default_as_str.strip(chr(39))})"
            print(textwrap.fill(f"--{name}: {' '.join(flag.help.split())}{default}", width=100,
                                initial_indent="  ", subsequent_indent="      "))
        print()
    print("--helpfull lists absl's own flags too.")


def parse_flags(argv, doc=""):
    """absl's parse of argv (argv[0] the program's name); --help prints doc and the flags."""
    if any(arg in ("-h", "-help", "--help", "-helpshort", "--helpshort", "-?") for arg in argv[1:]):
        print_help(doc)
        sys.exit(0)
    try:
        return FLAGS(list_flags_from_last_source(argv))
    except flags.Error as error:  # a missing flagfile, a bad enum value, a malformed number
        exit_at_start(str(error).replace('ERROR:: ', ''))
    except UserError as error:
        exit_at_start(str(error))


def exit_at_start(line):
    """Ends the command with its one error line, once the other processes of a torchrun job
    know (they would otherwise wait for this one until their start-up deadline)."""
    distributed.report_start_failure(line)
    sys.exit(f"error: {line}")


def configuration_from_flags():
    """The Config of the parsed flags, each section checked by its own code."""
    return config.Config.make(**{name: FLAGS[name].value for name in config.FIELD_SECTIONS})


def configuration(argv):
    """The Config of a command line (argv[0] is the program's name), as main.py would run it;
    the flags are left unparsed. For scripts and tests that start a run in their own process."""
    FLAGS.unparse_flags()
    try:
        parse_flags(argv)
        return configuration_from_flags()
    finally:
        FLAGS.unparse_flags()
