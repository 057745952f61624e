"""Who may do what where: repository globs -> actions for users, groups, `anonymous`, `authenticated`.

The most specific rule wins (the longest pattern that matches, as in zot's accessControl); within it the
caller gets the union of every grant that applies to them. No rule, no access: once auth is on, the
default is deny. Anonymous grants apply to everyone (a logged-in user may do at least what a stranger may).
Repositories routed to an upstream are mirrored copies: only `pull` is ever granted on them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mirror.routing import glob_to_regex

PULL, PUSH, DELETE, OVERWRITE = "pull", "push", "delete", "overwrite"
ACTIONS = (PULL, PUSH, DELETE, OVERWRITE)
NOTHING: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking: `name` None means anonymous."""

    name: str | None
    groups: frozenset[str] = frozenset()
    kind: str = "anonymous"  # anonymous, user, robot

    @property
    def anonymous(self) -> bool:
        return self.name is None

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "anonymous"


ANONYMOUS = Identity(None)


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: str
    regex: re.Pattern[str]
    anonymous: frozenset[str]
    authenticated: frozenset[str]
    users: Mapping[str, frozenset[str]]
    groups: Mapping[str, frozenset[str]]
    immutable_tags: tuple[re.Pattern[str], ...]
    immutable_tag_patterns: tuple[str, ...]

    def grants(self, identity: Identity) -> frozenset[str]:
        granted = set(self.anonymous)
        if not identity.anonymous:
            granted |= self.authenticated
            granted |= self.users.get(identity.name or "", NOTHING)
            for group in identity.groups:
                granted |= self.groups.get(group, NOTHING)
        return frozenset(granted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": self.pattern,
            "anonymous": sorted(self.anonymous),
            "authenticated": sorted(self.authenticated),
            "users": {k: sorted(v) for k, v in self.users.items()},
            "groups": {k: sorted(v) for k, v in self.groups.items()},
            "immutable_tags": list(self.immutable_tag_patterns),
        }


def compile_rule(
    pattern: str,
    anonymous: frozenset[str],
    authenticated: frozenset[str],
    users: Mapping[str, frozenset[str]],
    groups: Mapping[str, frozenset[str]],
    immutable_tags: tuple[str, ...] = (),
) -> Rule:
    return Rule(
        pattern=pattern,
        regex=glob_to_regex(pattern),
        anonymous=anonymous,
        authenticated=authenticated,
        users=dict(users),
        groups=dict(groups),
        # Tags have no '/', so one '*' is "any run of tag characters".
        immutable_tags=tuple(glob_to_regex(p) for p in immutable_tags),
        immutable_tag_patterns=immutable_tags,
    )


class Policy:
    def __init__(self, rules: tuple[Rule, ...]) -> None:
        # Longest pattern first; among equal lengths, the one written first in the file.
        self._rules = sorted(rules, key=lambda r: -len(r.pattern))

    def rule_for(self, repository: str) -> Rule | None:
        return next((rule for rule in self._rules if rule.regex.fullmatch(repository)), None)

    def allowed(self, identity: Identity, repository: str, *, mirrored: bool) -> frozenset[str]:
        """The actions `identity` may take on `repository` (its routed name: `upstream/repo` if mirrored)."""
        rule = self.rule_for(repository)
        if rule is None:
            return NOTHING
        granted = rule.grants(identity)
        return granted & {PULL} if mirrored else granted

    def immutable(self, repository: str, tag: str) -> bool:
        rule = self.rule_for(repository)
        return rule is not None and any(regex.fullmatch(tag) for regex in rule.immutable_tags)
