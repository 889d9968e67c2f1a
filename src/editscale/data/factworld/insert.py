"""Insertion facts: facts about subjects the embedded model never saw, so a run can make far more
edits than the world has subjects (it has 1,800; a 10,000-edit run needs new ones).

An insertion record teaches a new subject one fact of a world relation. Its rewrite prompt is one
of the relation's trained phrasings and its paraphrases are the other three, so PS asks the new
fact in wordings the model knows for that relation. There is no true object to displace: the
edit is scored against an *alternative* object of the relation (the record's `target_true`),
and its neighbourhood prompts are world facts whose object is that alternative, so NS still asks
whether the new object leaks into facts the model knows. The world's own facts stay untouched and
remain the run's control set (`data/registry.control_pool`).
"""

from __future__ import annotations

import random
from collections import defaultdict

from editscale.data.factworld.world import RELATIONS, FactWorld, new_name
from editscale.data.records import EditRecord

# case_ids of insertion facts start here, far above the world's own (0 to n_subjects - 1)
CASE_ID_BASE = 100_000
N_INSERTIONS = 20_000


def training_records(world: FactWorld, n: int) -> list[EditRecord]:
    """`n` insertion facts for training an editor network (MEND): generated after the `N_INSERTIONS`
    evaluation facts by the same generator, so their subjects differ from every evaluation edit's."""
    return insertion_records(world, N_INSERTIONS + n)[N_INSERTIONS:]


def insertion_records(world: FactWorld, n: int = N_INSERTIONS, *, seed: int = 1, n_neighbors: int = 10
                      ) -> list[EditRecord]:
    """`n` insertion facts about new subjects (names distinct from the world's and each other); the
    first k of n are the k of any larger n."""
    rng = random.Random(f"insert-{seed}")
    taken = {s.lower() for s in world.reserved_names}
    holders = defaultdict(list)  # (relation_id, object) -> world facts holding that object
    for f in world.facts:
        holders[(f.relation.relation_id, f.obj)].append(f)
    out = []
    for i in range(n):
        rel = RELATIONS[i % len(RELATIONS)]
        subject = new_name(rng, rel.subject_kind, taken)
        new, alternative = rng.sample(rel.objects, 2)
        prompt = rng.choice(rel.trained)
        peers = holders[(rel.relation_id, alternative)]
        neighbors = rng.sample(peers, min(n_neighbors, len(peers)))
        attributes = holders[(rel.relation_id, new)]
        out.append(EditRecord(
            case_id=CASE_ID_BASE + i, subject=subject, prompt=prompt, target_true=alternative, target_new=new,
            relation_id=rel.relation_id,
            paraphrase_prompts=tuple(t.format(subject) for t in rel.trained if t != prompt),
            neighborhood_prompts=tuple(g.prompt.format(g.subject) for g in neighbors),
            attribute_prompts=tuple(g.prompt.format(g.subject) for g in rng.sample(attributes, min(n_neighbors,
                                                                                                 len(attributes)))),
            extra={"unseen_prompts": [t.format(subject) for t in rel.unseen], "relation": rel.name,
                   "subject_kind": rel.subject_kind, "insertion": True},
        ))
    return out
