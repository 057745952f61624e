"""Resolving a rule: which tags it selects, what each is at the source (HEAD), what each destination has.

The whole plan costs the source a tag listing and one HEAD per selected tag — free under Docker Hub's
limits — so an unchanged rule is decided without a single GET of a manifest or blob. A destination costs
a HEAD per tag, or between full checks (the engine decides when) one tag listing.

Tag selection, in order: `include` (regex, must match the whole tag), `exclude` (the same), `semver`
(a version range; tags that are not versions are dropped), `latest` (the N highest: versions ordered as
versions and above everything else, the rest in natural order, so 3.9 < 3.10 and 2024-01-09 < 2024-01-10).
Versions and ranges follow PEP 440 (`packaging`), which reads Docker tags such as `3.19`, `v1.2.3` and
`1.2.3-rc1` (a pre-release, outside a range unless the range names one), where strict SemVer would refuse
the two-component tags most images use.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from mirror.errors import NameUnknown, RegistryError
from mirror.oci.digest import Digest
from mirror.replication.copier import COSIGN_SUFFIXES, tag_digest
from mirror.replication.rules import Rule, TagFilter
from mirror.storage.interface import Registry

log = logging.getLogger(__name__)

_DIGITS = re.compile(r"(\d+)")
PLAN_CONCURRENCY = 16  # tags resolved at once (each: a HEAD at the source and at every destination, together)


def as_version(tag: str) -> Version | None:
    try:
        return Version(tag)
    except InvalidVersion:
        return None


def _natural_key(tag: str) -> tuple[tuple[int, int | str], ...]:
    # Numbers rank above words: a dated tag (2024-01-10) is newer than a moving name (nightly, edge).
    return tuple((1, int(part)) if part.isdigit() else (0, part) for part in _DIGITS.split(tag) if part)


def _newness(tag: str) -> tuple[int, Version | tuple[tuple[int, int | str], ...]]:
    version = as_version(tag)
    return (1, version) if version is not None else (0, _natural_key(tag))


_REFERRERS_TAG = re.compile(r"sha256-[0-9a-f]{64}")


def is_signature_tag(tag: str) -> bool:
    """cosign's `sha256-<hex>.sig/.att/.sbom`, and OCI's referrers tag `sha256-<hex>` (the index of an
    image's referrers at a registry without the referrers API): they travel with the image they belong
    to, never as images of their own."""
    return (tag.startswith("sha256-") and tag.endswith(COSIGN_SUFFIXES)) or bool(_REFERRERS_TAG.fullmatch(tag))


def select_tags(tags: Iterable[str], wanted: TagFilter) -> list[str]:
    """The tags a rule replicates, newest first when `latest` ordered them, else sorted."""
    selected = [tag for tag in tags if not is_signature_tag(tag)]
    if wanted.include is not None:
        include = re.compile(wanted.include)
        selected = [tag for tag in selected if include.fullmatch(tag)]
    if wanted.exclude is not None:
        exclude = re.compile(wanted.exclude)
        selected = [tag for tag in selected if not exclude.fullmatch(tag)]
    if wanted.semver is not None:
        allowed = SpecifierSet(wanted.semver)
        # Said explicitly: packaging admits a pre-release into a range when nothing else matches it.
        pre = bool(allowed.prereleases)
        selected = [tag for tag in selected
                    if (v := as_version(tag)) is not None and allowed.contains(v, prereleases=pre)]
    if wanted.latest is not None:
        return sorted(selected, key=_newness, reverse=True)[: wanted.latest]
    return sorted(selected, key=_newness, reverse=True)


@dataclass(frozen=True, slots=True)
class Target:
    """One destination of a rule, opened."""

    key: str  # Destination.key
    registry: Registry
    repository: str


@dataclass(slots=True)
class Job:
    tag: str
    source_digest: Digest
    # Destinations whose tag does not name what this copy would produce (key -> current digest or None).
    stale: dict[str, Digest | None] = field(default_factory=dict)
    # Destinations already up to date (key -> digest).
    current: dict[str, Digest] = field(default_factory=dict)


@dataclass(slots=True)
class Plan:
    source_tags: list[str]
    jobs: list[Job]
    # dest key -> tags this rule wrote there that it selects no more (gone at the source, or filtered out)
    gone: dict[str, list[str]] = field(default_factory=dict)
    # dest keys checked by their tag list and the journal; every other destination was HEADed tag by tag
    listed: frozenset[str] = frozenset()

    @property
    def to_copy(self) -> list[Job]:
        return [job for job in self.jobs if job.stale]


async def make_plan(
    rule: Rule,
    source: Registry,
    targets: Sequence[Target],
    *,
    expected: Mapping[str, Mapping[str, str]] | None = None,
    written: Mapping[str, Mapping[str, str]] | None = None,
    by_listing: Collection[str] = (),
) -> Plan:
    """Resolve `rule`: tags at the source, one HEAD per selected tag, and what each destination holds.

    A destination is asked with one HEAD per tag, or, when its key is in `by_listing`, with its tag list
    (one request per page instead of one per tag): a listed tag counts as current when this rule's journal
    says it wrote there what the copy would produce now; a tag the journal does not vouch for is still
    HEADed, and one missing from the list is stale. A destination that cannot be listed is HEADed.

    `expected` maps a destination key to {source digest: the digest written for it} from earlier runs
    (a platform-filtered index is a new document, so its digest is not the source's). `written` maps a
    destination key to {tag: digest} this rule wrote or found there (the journal; for prune: the tags it
    no longer selects)."""
    listed_targets = [target for target in targets if target.key in by_listing]
    try:
        source_tags, listings = await asyncio.gather(
            source.list_tags(rule.source.repository), _listings(listed_targets))
    except NameUnknown as exc:
        raise NameUnknown(f"source {rule.source} does not exist (no tags to list)", detail=exc.detail) from exc
    listing = {target.key: tags for target, tags in zip(listed_targets, listings, strict=True) if tags is not None}
    headed = [target for target in targets if target.key not in listing]
    slots = asyncio.Semaphore(PLAN_CONCURRENCY)

    async def resolve(tag: str) -> Job | None:
        async with slots:
            # The source's and the destinations' HEADs do not depend on each other: one round trip, not two.
            digest, *at_dests = await asyncio.gather(
                tag_digest(source, rule.source.repository, tag),
                *(tag_digest(target.registry, target.repository, tag) for target in headed),
            )
            if digest is None:
                return None  # deleted between the listing and the HEAD
            job = Job(tag, digest)
            found = dict(zip((target.key for target in headed), at_dests, strict=True))
            for target in targets:
                want_text = (expected or {}).get(target.key, {}).get(str(digest))
                want = Digest.parse(want_text) if want_text else digest
                if target.key in listing:
                    if tag not in listing[target.key]:
                        job.stale[target.key] = None
                        continue
                    if (written or {}).get(target.key, {}).get(tag) == str(want):
                        job.current[target.key] = want
                        continue
                    found[target.key] = await tag_digest(target.registry, target.repository, tag)
                at_dest = found[target.key]
                if at_dest is not None and at_dest == want:
                    job.current[target.key] = at_dest
                else:
                    job.stale[target.key] = at_dest
            return job

    # HEADs are cheap but each costs a round trip: a rule of 60 tags resolved one by one waits 60 of them.
    resolved = await asyncio.gather(*(resolve(tag) for tag in select_tags(source_tags, rule.tags)))
    jobs = [job for job in resolved if job is not None]
    # With `prune`, a destination mirrors the selection: a tag that fell out of `latest: 5` goes like one
    # deleted at the source. Only tags this rule wrote are candidates, never anyone else's.
    selected = {job.tag for job in jobs}
    gone = {
        key: sorted(tag for tag in tags if tag not in selected)
        for key, tags in (written or {}).items()
    }
    return Plan(source_tags=source_tags, jobs=jobs, gone={k: v for k, v in gone.items() if v},
                listed=frozenset(listing))


async def _listings(targets: Sequence[Target]) -> list[frozenset[str] | None]:
    return await asyncio.gather(*(_listing(target) for target in targets))


async def _listing(target: Target) -> frozenset[str] | None:
    """The tags a destination repository has (none when it does not exist), or None when it cannot say
    (a registry that refuses tag lists, a hiccup): the plan then HEADs each tag there instead."""
    try:
        return frozenset(await target.registry.list_tags(target.repository))
    except NameUnknown:
        return frozenset()
    except (TimeoutError, RegistryError, aiohttp.ClientError) as exc:
        log.info("destination %s: no tag list (%s): checking each tag with HEAD", target.key, exc)
        return None
