"""Which VLMEvalKit a score reproduces: upstream main, or one of the snapshots on the package index.

VLMEvalKit's scoring changed over time, and the packages on the index (`ms-vlmeval`,
`nvidia-vlmeval`, both the `vlmeval` package) lag behind the repository. Every rule that
differs between the versions we reproduce is a field here, so that a score names the
version it follows and two versions can be told apart rule by rule. docs/eval.md lists the
same table; tests/eval/test_vlmevalkit_crosscheck.py checks the installed snapshots against
their own `evaluate`.

- `main`: open-compass/VLMEvalKit at commit e8e78f05f3080fe28154f2130321f17951c3be94
  (2026-08-18), read from its source. The default.
- `ms-vlmeval-0.0.20`: the `ms-vlmeval` 0.0.20 wheel (packaged 2026-05), the snapshot CI
  installs into the environment.
- `nvidia-vlmeval-26.3`: the `nvidia-vlmeval` 26.3 wheel, an older snapshot; CI installs it
  beside the other one (its own directory) and checks it too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# The period rule of the VQA answer normalisation. Upstream main and ms-vlmeval delete a period
# unless a digit is on either side of it; the old rule's "(?!<=\d)" is a look-AHEAD for the text
# "<=" + digit (a typo for a look-behind), so it deletes every period not followed by a digit,
# including the one in "3." after a digit.
PERIOD_LOOKBEHIND = re.compile(r'(?<!\d)\.(?!\d)')
PERIOD_LOOKAHEAD_QUIRK = re.compile(r'(?!<=\d)(\.)(?!\d)')


@dataclass(frozen=True)
class VLMEvalKitVersion:
    name: str
    source: str
    period_pattern: re.Pattern
    answer_is_rule: bool          # "the answer is X" (A-D) picks an option when no lone letter does
    option_last_tokens: bool      # a lone option letter counts only among the last tokens
    option_text_length_guard: bool  # option-text matching gives up on predictions > 2x the option text
    relaxed_target_first: bool    # relaxed_correctness(target, prediction); False: arguments swapped
    xlsx_strings_to_formulas: bool  # predictions starting with '=' are written to .xlsx as formulas
    image_suffix: str             # dump_image's file type for a single image: '.png' or '.jpg'
    ocrbench_sum_count: bool      # OCRBench reports {'sum', 'count'} per key instead of points
    has_simplevqa: bool           # the version ships the SimpleVQA dataset class


VERSIONS: dict[str, VLMEvalKitVersion] = {
    'main': VLMEvalKitVersion(
        name='main', source='open-compass/VLMEvalKit@e8e78f05f3080fe28154f2130321f17951c3be94 (2026-08-18)',
        period_pattern=PERIOD_LOOKBEHIND, answer_is_rule=True, option_last_tokens=True,
        option_text_length_guard=True, relaxed_target_first=True, xlsx_strings_to_formulas=False,
        image_suffix='.png', ocrbench_sum_count=False, has_simplevqa=True),
    'ms-vlmeval-0.0.20': VLMEvalKitVersion(
        name='ms-vlmeval-0.0.20', source='ms-vlmeval==0.0.20 (package index)',
        period_pattern=PERIOD_LOOKBEHIND, answer_is_rule=False, option_last_tokens=True,
        option_text_length_guard=True, relaxed_target_first=True, xlsx_strings_to_formulas=True,
        image_suffix='.png', ocrbench_sum_count=False, has_simplevqa=True),
    'nvidia-vlmeval-26.3': VLMEvalKitVersion(
        name='nvidia-vlmeval-26.3', source='nvidia-vlmeval==26.3 (package index)',
        period_pattern=PERIOD_LOOKAHEAD_QUIRK, answer_is_rule=False, option_last_tokens=False,
        option_text_length_guard=False, relaxed_target_first=False, xlsx_strings_to_formulas=True,
        image_suffix='.jpg', ocrbench_sum_count=True, has_simplevqa=False),
}
DEFAULT_VERSION = 'main'
# The wheel whose `vlmeval` package dev.sh installs into the environment (the other one goes to
# its own directory, see dev.sh); `installed_version()` maps an installed package to its entry.
PACKAGE_VERSIONS = {('ms-vlmeval', '0.0.20'): 'ms-vlmeval-0.0.20', ('nvidia-vlmeval', '26.3'): 'nvidia-vlmeval-26.3'}


class UnknownVersionError(ValueError):
    pass


def get_version(name: str | VLMEvalKitVersion | None = None) -> VLMEvalKitVersion:
    """The version entry for a name (None: the default); unknown names fail listing the valid ones."""
    if isinstance(name, VLMEvalKitVersion):
        return name
    name = DEFAULT_VERSION if name is None else name
    if name not in VERSIONS:
        raise UnknownVersionError(f'unknown VLMEvalKit version {name!r}; valid: {", ".join(VERSIONS)}')
    return VERSIONS[name]


def installed_version() -> str | None:
    """The VERSIONS key of the `vlmeval` distribution installed here, or None."""
    from importlib import metadata

    for (package, version), key in PACKAGE_VERSIONS.items():
        try:
            if metadata.version(package) == version:
                return key
        except metadata.PackageNotFoundError:
            continue
    return None


__all__ = ['DEFAULT_VERSION', 'PACKAGE_VERSIONS', 'UnknownVersionError', 'VERSIONS', 'VLMEvalKitVersion',
           'get_version', 'installed_version']
