"""The fact world asked as zsRE asks: questions in MEND's zsRE format, and the completion prompts
that ask the same facts in the text-completion form the embedded model was trained on.

This is the data of the paper's appendix A.1 check (`editscale zsre-check`) for the embedded model:
a fact edited in question form ("Where was Brakos born?" -> Tokyo) should be retrieved when the
same fact is asked as a completion ("The birthplace of Brakos is"). The questions are never in
the model's training text; each completion prompt is the phrasing its fact was trained in.

Each world fact becomes one MEND-format record: `src` and `rephrase` are two questions of its
relation, `alt` is the world record's counterfactual object, `answers` its true object, and
`loc`/`loc_ans` ask another fact of another relation (zsRE's unrelated Natural Questions pair).
"""

from __future__ import annotations

import random
from typing import Any

from editscale.data.factworld.world import FactWorld

# relation_id -> (question, rephrased question), "{}" for the subject
QUESTIONS: dict[str, tuple[str, str]] = {
    "P103": ("What is the mother tongue of {}?", "Which language did {} grow up speaking?"),
    "P27": ("Which country is {} a citizen of?", "What country issued the passport of {}?"),
    "P19": ("Where was {} born?", "In which city was {} born?"),
    "P1303": ("What instrument does {} play?", "Which instrument is {} known for?"),
    "P101": ("What field does {} work in?", "What is the area of expertise of {}?"),
    "P159": ("Where is {} headquartered?", "In which city is the head office of {}?"),
    "P30": ("On which continent is {}?", "What continent is {} located on?"),
    "P407": ("In which language was {} written?", "What language is the text of {} in?"),
    "P495": ("In which country was {} created?", "What is the country of origin of {}?"),
}


def qa_mend_records(world: FactWorld, *, seed: int = 0) -> list[dict[str, Any]]:
    """One MEND-format zsRE record per world fact, in the world's order (so the list position, a
    zsRE record's case_id, is the fact's case_id)."""
    rng = random.Random(f"qa-{seed}")
    out = []
    for fact, record in zip(world.facts, world.records, strict=True):
        question, rephrase = QUESTIONS[fact.relation.relation_id]
        other = rng.choice([g for g in world.facts if g.relation.relation_id != fact.relation.relation_id])
        loc_question = QUESTIONS[other.relation.relation_id][0].format(other.subject).rstrip("?")
        out.append({
            "subject": fact.subject,
            "src": question.format(fact.subject),
            "pred": fact.obj,
            "rephrase": rephrase.format(fact.subject),
            "alt": record.target_new,
            "answers": [fact.obj],
            "loc": f"nq question: {loc_question}",
            "loc_ans": other.obj,
            "cond": f"{fact.obj} >> {record.target_new} || {question.format(fact.subject)}",
        })
    return out


def completion_prompts(world: FactWorld) -> list[dict[str, Any]]:
    """The completion form of each record of `qa_mend_records`, in the layout of
    `zsre_text_completion_prompts.json` (scalable-model-editing/unified-model-editing, `data/`)."""
    return [{"case_index": i, "question": QUESTIONS[f.relation.relation_id][0].format(f.subject),
             "text_completion_prompt": f.inside.format(f.subject)}
            for i, f in enumerate(world.facts)]
