"""The verifiable rewards of 3D-RFT: one function per reward, a name -> function table, weights.

3D-RFT (arXiv 2603.04976) fine-tunes a video 3D-aware MLLM with GRPO, and its key idea is that
the reward *is* the evaluation metric: 3D IoU and detection F1 for 3D detection, frame distance
and 3D IoU for visual grounding, option accuracy and Mean Relative Accuracy (MRA) for VSI-Bench
style spatial questions, plus a format reward for the `<think>...</think><answer>...</answer>`
template (docs/DESIGN.md, "Rewards" and "Evaluation"). This is the file to edit for a reward
ablation, read top to bottom:

  1. Rewards          one function per reward, each `f(completion, record) -> float`,
                      guarded so that malformed or hostile text scores 0 and never raises.
  2. Reward tables    name -> function, default per-task weights, weight parsing, the total.
  3. Safe parsing     model text -> Python values, with json / ast.literal_eval, never eval.
  4. Metrics          greedy detection matching (TP/FP/FN) and MRA, shared with eval.py.

The box maths and the exact oriented-box IoU live in boxes.py. Nothing here knows about models
or the synthetic world, so the same code scores the real ScanNet / ScanRefer / VSI-Bench records.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import re
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from boxes import BOX_SIZE, box_corners, corners_iou, iou_matrix
from data import FORMAT_TAGS, MC_QUESTION_TYPES, NUMERIC_QUESTION_TYPES, TASKS

# =============================================================================================
# 1. Rewards
# =============================================================================================
# Each reward is `f(completion: str, record: dict) -> float`, where `record` is one JSON-lines
# data record (the VG LLM format; docs/DESIGN.md "Records and prompts"). The `_reward` guard makes
# every one of them total: any exception -> 0.0, NaN -> 0.0, and the value is clamped to the
# documented range (also stored as `f.reward_range` for tests). A reward that does not apply
# to the record's task returns 0.
#
# Record keys used: `task` in {"detection", "grounding", "spatial"};
#   detection: `boxes` (ground truth, list of {"label", "bbox_3d"}, first-frame camera coords);
#   grounding: `gt_bbox` (9 numbers, axis-aligned scene frame), `gt_frame` (index into the
#              sampled frames), `cam2global` (one 4x4 per sampled frame), `axis_align_matrix`
#              (4x4; identity if missing);
#   spatial:   `question_type`, `answer` (option letter, or a number / numeric string).

RewardFn = Callable[[str, dict], float]


def _reward(lo: float = 0.0, hi: float = 1.0,
            tasks: tuple[str, ...] = TASKS) -> Callable[[Callable[..., float]], RewardFn]:
    """Decorator: never raise, never return NaN / inf, always land in [lo, hi].

    `tasks` names the tasks whose records the reward scores (0 on any other): grpo.py refuses
    weights that would only ever see 0 (`check_weights`). Stored as `f.tasks`.
    """
    def wrap(fn: Callable[..., float]) -> RewardFn:
        @functools.wraps(fn)
        def safe(completion: str, record: dict) -> float:
            try:
                value = float(fn(completion, record))
            except Exception:
                return 0.0
            if not math.isfinite(value):
                return 0.0
            return min(hi, max(lo, value))
        safe.reward_range = (lo, hi)  # type: ignore[attr-defined]
        safe.tasks = tasks  # type: ignore[attr-defined]
        return safe
    return wrap


def _answer(completion: str) -> str | None:
    """The answer text of a well-formed completion, else None."""
    return parse_completion(completion)[1]


def _task(record: dict) -> str:
    return str(record.get("task", ""))


def _gt_boxes(record: dict) -> list[dict]:
    """Ground-truth detection boxes of a record (trusted data, no validation)."""
    return [{"label": b["label"], "bbox_3d": b["bbox_3d"]} for b in record.get("boxes") or []]


def is_multiple_choice(record: dict) -> bool:
    """Is this spatial question multiple choice? By `question_type`; for an unknown type, by
    `options` being present or the answer being a letter rather than a number."""
    qtype = record.get("question_type")
    if qtype in MC_QUESTION_TYPES:
        return True
    if qtype in NUMERIC_QUESTION_TYPES:
        return False
    answer = record.get("answer")
    return bool(record.get("options")) or (isinstance(answer, str)
                                           and parse_choice(answer) is not None
                                           and parse_number(answer) is None)


# --- format ---------------------------------------------------------------------------------

@_reward(0.0, 1.0)
def format_reward(completion: str, record: dict) -> float:
    """R_format in {0, 1}: 1 iff the completion has the `<think>..</think><answer>..</answer>`
    form (see `parse_completion`) and the answer parses as the task's answer:
    detection: a list of boxes (`parse_boxes`; empty list allowed); grounding: a dict with an
    int "frame" and a 9-number "bbox_3d" (`parse_grounding`; frame range not checked here);
    spatial: an option letter (`parse_choice`) for multiple choice, else a finite number
    (`parse_number`). Unknown task: 0.
    """
    answer = _answer(completion)
    if answer is None:
        return 0.0
    task = _task(record)
    if task == "detection":
        ok = parse_boxes(answer) is not None
    elif task == "grounding":
        ok = parse_grounding(answer) is not None
    elif task == "spatial":
        ok = (parse_choice(answer) if is_multiple_choice(record) else parse_number(answer)) is not None
    else:
        ok = False
    return 1.0 if ok else 0.0


# --- detection ------------------------------------------------------------------------------

def _detection(completion: str, record: dict) -> tuple[list[dict], list[dict]] | None:
    """(predicted boxes, ground-truth boxes) for a detection record, None if not applicable."""
    if _task(record) != "detection":
        return None
    answer = _answer(completion)
    pred = parse_boxes(answer) if answer is not None else None
    return None if pred is None else (pred, _gt_boxes(record))


@_reward(0.0, 1.0, tasks=("detection",))
def iou_reward(completion: str, record: dict) -> float:
    """R_IoU in [0, 1]: mean over predicted boxes of the best 3D IoU with any ground-truth box
    (labels ignored). Empty prediction and empty ground truth: 1 (a perfect answer); exactly
    one of them empty: 0. Malformed answer or non-detection record: 0.
    """
    return _score_boxes(completion, record, lambda pred, gt: float(iou_matrix(pred, gt).max(axis=1).mean()))


def _score_boxes(completion: str, record: dict, score: Callable[[list[dict], list[dict]], float]) -> float:
    """The box rewards' shared frame: `score(pred, gt)` when both lists are non-empty; empty
    prediction and empty truth: 1 (a perfect answer); exactly one empty: 0; not a detection
    answer (malformed, or another task): 0."""
    both = _detection(completion, record)
    if both is None:
        return 0.0
    pred, gt = both
    if not pred or not gt:
        return 1.0 if not pred and not gt else 0.0
    return score(pred, gt)


def _both_ways(matrix: np.ndarray) -> float:
    """Mean of a (pred x truth) score matrix's two chamfer halves: each prediction's best truth
    (precision-like) and each truth's best prediction (recall-like)."""
    return 0.5 * float(matrix.max(axis=1).mean()) + 0.5 * float(matrix.max(axis=0).mean())


@_reward(0.0, 1.0, tasks=("detection",))
def iou_both_ways_reward(completion: str, record: dict) -> float:
    """R_IoU made recall-aware (an ablation, not the paper's R_IoU): the mean of R_IoU's
    precision-like half (each predicted box's best IoU with any true box) and a recall-like half
    (each true box's best IoU with any prediction), labels ignored as in R_IoU.

    Why: R_IoU alone rises when a doubtful box is left out (the mean over predictions loses its
    lowest term), and GRPO runs with it answered fewer boxes than the SFT model (docs/EXPERIMENTS.md item 19).
    Here a missed object costs its share of the second half. Empty cases as R_IoU.
    Example: truth [chair, table], prediction [chair exactly] -> 0.5 * 1 + 0.5 * (1 + 0) / 2 = 0.75.
    """
    return _score_boxes(completion, record, lambda pred, gt: _both_ways(iou_matrix(pred, gt)))


@_reward(0.0, 1.0, tasks=("detection",))
def f1_reward(completion: str, record: dict) -> float:
    """R_F1 in [0, 1]: 2TP / (2TP + FP + FN) with `match_detections` at IoU > 0.25.
    Empty prediction and empty ground truth: 1 (nothing to find, nothing claimed); exactly
    one of them empty: 0. Malformed answer or non-detection record: 0.
    """
    both = _detection(completion, record)
    if both is None:
        return 0.0
    tp, fp, fn = match_detections(both[0], both[1], 0.25)
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)


CENTRE_SCALE_M = 0.5  # distance (metres) at which R_centre's closeness has fallen to 1/e


@_reward(0.0, 1.0, tasks=("detection",))
def centre_reward(completion: str, record: dict) -> float:
    """R_centre in [0, 1]: a dense shaping term, not one of the paper's rewards (an ablation).

    R_IoU is 0 for every box that misses its object entirely, which is most boxes of a model whose
    centres are ~0.7 m off, so it says nothing about *which* miss was closer. Here each pair of
    same-label boxes scores closeness = exp(-|c_pred - c_gt| / CENTRE_SCALE_M), and the reward is
    the mean of two chamfer halves: each predicted box's closest same-label truth (precision-like)
    and each true box's closest same-label prediction (recall-like), so neither one big box nor
    one safe box can win it. Empty prediction and empty truth: 1; exactly one empty: 0.
    Example: truth [chair at (0, 0, 2)], prediction [chair at (0, 0, 2.5)] -> exp(-1) = 0.37.
    """
    return _score_boxes(completion, record, lambda pred, gt: _both_ways(centre_closeness(pred, gt)))


def centre_closeness(pred: list[dict], gt: list[dict]) -> np.ndarray:
    """(num_pred, num_gt): exp(-centre distance / CENTRE_SCALE_M) for same-label pairs, else 0."""
    centres_p = np.array([b["bbox_3d"][:3] for b in pred], dtype=np.float64)
    centres_g = np.array([b["bbox_3d"][:3] for b in gt], dtype=np.float64)
    same = np.array([[norm_label(p["label"]) == norm_label(g["label"]) for g in gt] for p in pred])
    distance = np.linalg.norm(centres_p[:, None, :] - centres_g[None, :, :], axis=-1)
    return np.where(same, np.exp(-distance / CENTRE_SCALE_M), 0.0)


# --- grounding ------------------------------------------------------------------------------

def _grounding(completion: str, record: dict) -> tuple[int, list[float]] | None:
    """(frame, box) of a grounding answer whose frame indexes the record's sampled frames."""
    if _task(record) != "grounding":
        return None
    answer = _answer(completion)
    parsed = parse_grounding(answer) if answer is not None else None
    if parsed is None or not 0 <= parsed[0] < len(record["cam2global"]):
        return None  # a frame outside the sampled frames invalidates the whole answer
    return parsed


@_reward(0.0, 1.0, tasks=("grounding",))
def frame_reward(completion: str, record: dict) -> float:
    """R_frame in [0, 1] = max(0, 1 - |f_pred - f_gt| / 5). A frame outside 0..len(cam2global)-1
    (or not an int), a malformed answer or a non-grounding record: 0.
    """
    parsed = _grounding(completion, record)
    if parsed is None:
        return 0.0
    return max(0.0, 1.0 - abs(parsed[0] - int(record["gt_frame"])) / 5.0)


@_reward(0.0, 1.0, tasks=("grounding",))
def grounding_iou_reward(completion: str, record: dict) -> float:
    """R_IoU for grounding, in [0, 1]: the predicted box is in the camera frame of the predicted
    frame f; its corners are mapped to the scene by axis_align_matrix @ cam2global[f] and IoU'd
    exactly with the ground-truth box (`gt_bbox`, axis-aligned scene frame). Invalid frame,
    malformed answer or non-grounding record: 0.
    """
    parsed = _grounding(completion, record)
    if parsed is None:
        return 0.0
    frame, box = parsed
    align = np.asarray(record.get("axis_align_matrix", np.eye(4)), dtype=float).reshape(4, 4)
    to_scene = align @ np.asarray(record["cam2global"][frame], dtype=float).reshape(4, 4)
    corners = box_corners(box) @ to_scene[:3, :3].T + to_scene[:3, 3]
    return corners_iou(corners, box_corners(record["gt_bbox"]))


# --- spatial question answering (VSI-Bench) -------------------------------------------------

@_reward(0.0, 1.0, tasks=("spatial",))
def accuracy_reward(completion: str, record: dict) -> float:
    """Multiple-choice accuracy in {0, 1}: the answer's option letter equals the record's
    (case-insensitive; letter variants as in `parse_choice`). Numeric or non-spatial
    records, or malformed answers: 0.
    """
    if _task(record) != "spatial" or not is_multiple_choice(record):
        return 0.0
    answer = _answer(completion)
    pred = parse_choice(answer) if answer is not None else None
    gt = parse_choice(str(record["answer"]))
    return 1.0 if pred is not None and pred == gt else 0.0


@_reward(0.0, 1.0, tasks=("spatial",))
def mra_reward(completion: str, record: dict) -> float:
    """Numeric answer score in [0, 1]: `mra(pred, gt)` (gt == 0 -> exact match). Multiple-choice
    or non-spatial records, or malformed answers: 0.
    """
    if _task(record) != "spatial" or is_multiple_choice(record):
        return 0.0
    answer = _answer(completion)
    pred = parse_number(answer) if answer is not None else None
    gt = parse_number(record["answer"])
    return 0.0 if pred is None or gt is None else mra(pred, gt)


@_reward(0.0, 1.0, tasks=("spatial",))
def spatial_reward(completion: str, record: dict) -> float:
    """The spatial-QA task reward in [0, 1]: accuracy for multiple-choice question types, MRA
    for numeric ones (dispatch on `question_type`, see `is_multiple_choice`). Non-spatial records: 0.
    """
    if is_multiple_choice(record):
        return accuracy_reward(completion, record)
    return mra_reward(completion, record)


# =============================================================================================
# 2. Reward tables, weights and the total
# =============================================================================================
# The paper's total is R = R_format + R_task; the weights are configurable for ablations
# (e.g. `--reward iou=1,f1=0,format=1` to drop the F1 term).

REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "iou": iou_reward,
    "f1": f1_reward,
    "iou_both": iou_both_ways_reward,
    "centre": centre_reward,
    "frame": frame_reward,
    "grounding_iou": grounding_iou_reward,
    "accuracy": accuracy_reward,
    "mra": mra_reward,
    "spatial": spatial_reward,
}

# Default weights per task: R_det = R_IoU + R_F1, R_grd = R_frame + R_IoU, R_spatial, each
# plus R_format.
TASK_REWARDS: dict[str, dict[str, float]] = {
    "detection": {"format": 1.0, "iou": 1.0, "f1": 1.0},
    "grounding": {"format": 1.0, "frame": 1.0, "grounding_iou": 1.0},
    "spatial": {"format": 1.0, "spatial": 1.0},
}


def parse_weights(spec: str) -> dict[str, float]:
    """Parse "iou=1,f1=0.5,format=1" into {"iou": 1.0, "f1": 0.5, "format": 1.0}.

    Whitespace and empty items are ignored; an unknown name, a missing "=", a repeated name or
    a weight that is not a finite number raises ValueError saying which item is wrong.
    """
    weights: dict[str, float] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"reward weight {item.strip()!r} is not of the form name=number")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARDS)}")
        if name in weights:
            raise ValueError(f"reward {name!r} is given twice in {spec!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"weight of reward {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weight):
            raise ValueError(f"weight of reward {name!r} is not finite: {value!r}")
        weights[name] = weight
    return weights


def check_weights(weights: dict[str, float], task: str) -> None:
    """ValueError unless the weights give the task something to learn from.

    At least one reward must have a non-zero weight, and every named reward must score `task`.
    Example: check_weights({"format": 1, "frame": 1}, "detection") -> ValueError naming "frame".
    """
    if not any(w != 0 for w in weights.values()):
        raise ValueError("no reward has a non-zero weight (e.g. --reward format=1,iou=1,f1=1)")
    def scores(name: str) -> bool:  # a reward without `tasks` (not made by _reward) may score any task
        return task in getattr(REWARDS[name], "tasks", TASKS)

    foreign = [name for name in weights if not scores(name)]
    if foreign:
        raise ValueError(f"reward(s) {', '.join(foreign)} do not score {task} records (they would always be 0); "
                         f"{task} rewards: {', '.join(n for n in REWARDS if scores(n))}")


def total_reward(completion: str, record: dict,
                 weights: dict[str, Any] | None = None) -> tuple[float, dict[str, float]]:
    """The GRPO reward of one completion: (sum_k w_k * R_k, {k: R_k unweighted}).

    `weights` is a flat {name: weight} applied to every task, or per task like TASK_REWARDS
    ({task: {name: weight}}); None means TASK_REWARDS. Unknown reward names raise ValueError
    (a configuration error); the rewards themselves never raise.
    """
    if weights is None:
        weights = TASK_REWARDS
    if weights and all(isinstance(w, dict) for w in weights.values()):
        weights = weights.get(_task(record), {})
    unknown = [name for name in weights if name not in REWARDS]
    if unknown:
        raise ValueError(f"unknown rewards {unknown}; known rewards: {', '.join(REWARDS)}")
    components = {name: REWARDS[name](completion, record) for name in weights}
    total = sum(float(w) * components[name] for name, w in weights.items())
    return total, components


# =============================================================================================
# 3. Safe parsing of model text
# =============================================================================================
# Rewards are computed on text sampled from the policy, which during RL can be anything. So
# parsing never evaluates code (json.loads, then ast.literal_eval, which only builds
# literals), caps lengths and nesting before parsing, validates every number, and signals
# failure with None rather than an exception.

MAX_COMPLETION_CHARS = 100_000   # longer completions are malformed
MAX_ANSWER_CHARS = 20_000        # longer answers are not parsed at all
MAX_SHORT_ANSWER_CHARS = 200     # option letters and numbers are short
MAX_NESTING = 20                 # deeper bracket nesting is rejected before parsing
MAX_BOXES = 200                  # more predicted boxes than this is not a valid answer
MAX_ABS_BOX_VALUE = 1e4          # |box number| must be below this (metres / radians)


def parse_completion(text: str) -> tuple[str | None, str | None]:
    """Split `<think>T</think><answer>A</answer>` into (T, A), each stripped of whitespace.

    Accepted, exactly: optional whitespace, `<think>`, any text T (may be empty), `</think>`,
    optional whitespace, `<answer>`, any text A, `</answer>`, optional whitespace. Each of the
    four tags must occur exactly once (so T and A contain no tags); nothing else may appear
    outside them. Anything else (or a completion over MAX_COMPLETION_CHARS) gives (None, None).
    """
    if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
        return None, None
    s = text.strip()
    if any(s.count(tag) != 1 for tag in FORMAT_TAGS):
        return None, None
    t_open, t_close, a_open, a_close = (s.find(tag) for tag in FORMAT_TAGS)
    if t_open != 0 or a_close != len(s) - len("</answer>"):
        return None, None
    if not (t_close < a_open) or s[t_close + len("</think>"):a_open].strip():
        return None, None
    think = s[len("<think>"):t_close].strip()
    answer = s[a_open + len("<answer>"):a_close].strip()
    return think, answer


def _nesting_depth(text: str) -> int:
    """Maximum bracket depth of ([{ in `text` (string contents are not special-cased)."""
    depth = best = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            best = max(best, depth)
        elif ch in ")]}":
            depth -= 1
    return best


def _strip_fence(text: str) -> str:
    """Remove one surrounding Markdown code fence ("```json\n...\n```"), if present."""
    if len(text) >= 6 and text.startswith("```") and text.endswith("```"):
        inner = text[3:-3]
        first, newline, rest = inner.partition("\n")
        if newline and (not first.strip() or first.strip().isalpha()):
            inner = rest                      # drop the language tag line ("json")
        return inner.strip()
    return text


def parse_json(answer_text: str) -> Any:
    """Parse an answer as JSON, falling back to a Python literal; None when it is neither.

    A surrounding Markdown code fence (```json ... ```) is removed first. Input over
    MAX_ANSWER_CHARS or nested deeper than MAX_NESTING brackets is rejected unparsed.
    `ast.literal_eval` only builds literals (it cannot call, import or index), so text such as
    `__import__('os').system(...)` is just a parse failure. The result is *not* validated:
    NaN, Infinity, sets, bytes... can come back; the `parse_*` functions below validate.
    """
    if not isinstance(answer_text, str) or len(answer_text) > MAX_ANSWER_CHARS:
        return None
    text = answer_text.strip()
    text = _strip_fence(text)
    if not text or _nesting_depth(text) > MAX_NESTING:
        return None
    try:
        return json.loads(text)
    except Exception:
        pass
    try:
        # Python warns (SyntaxWarning, DeprecationWarning) about some text as it parses it, e.g.
        # "[1.2or 3]" (then fails) or '["\d"]' (then parses): during RL, a line per such sample.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.literal_eval(text)
    except Exception:
        return None


def _finite_number(value: Any, max_abs: float = math.inf) -> float | None:
    """`value` as a float if it is a real int/float (not bool), finite and |value| < max_abs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and abs(value) >= min(max_abs, 1e300):
        return None                                # also avoids int -> float overflow
    number = float(value)
    if not math.isfinite(number) or abs(number) >= max_abs:
        return None
    return number


def valid_bbox(value: Any) -> list[float] | None:
    """9 finite numbers with |v| < MAX_ABS_BOX_VALUE and sizes > 0, as floats; else None."""
    if not isinstance(value, (list, tuple)) or len(value) != BOX_SIZE:
        return None
    numbers = [_finite_number(v, MAX_ABS_BOX_VALUE) for v in value]
    if any(n is None for n in numbers) or any(n <= 0.0 for n in numbers[3:6]):
        return None
    return numbers  # type: ignore[return-value]


def _valid_entry(item: Any) -> dict[str, Any] | None:
    """A detection entry {"label": non-empty str, "bbox_3d": valid box} as parse_boxes keeps it."""
    if not isinstance(item, dict):
        return None
    label, bbox = item.get("label"), valid_bbox(item.get("bbox_3d"))
    if not isinstance(label, str) or not label.strip() or bbox is None:
        return None
    return {"label": label, "bbox_3d": bbox}


def parse_boxes(answer: str) -> list[dict[str, Any]] | None:
    """Detection answer -> [{"label": str, "bbox_3d": [9 floats]}], or None if invalid.

    Valid: a JSON (or Python literal) list, possibly empty, of at most MAX_BOXES dicts, each
    with a non-empty str "label" and a valid "bbox_3d" (9 finite numbers, |v| < 1e4, the three
    sizes > 0). Extra keys are ignored. One invalid entry makes the whole answer invalid.
    """
    data = parse_json(answer)
    if not isinstance(data, list) or len(data) > MAX_BOXES:
        return None
    boxes = [_valid_entry(item) for item in data]
    return None if any(box is None for box in boxes) else boxes


def parse_grounding(answer: str) -> tuple[int, list[float]] | None:
    """Grounding answer {"frame": int, "bbox_3d": [9 numbers]} -> (frame, box), or None.

    "frame" must be an int (not a bool, not a float); its range is checked by the rewards,
    which know how many frames were sampled. "bbox_3d" is validated as in `parse_boxes`.
    """
    data = parse_json(answer)
    if not isinstance(data, dict):
        return None
    frame, bbox = data.get("frame"), valid_bbox(data.get("bbox_3d"))
    if isinstance(frame, bool) or not isinstance(frame, int) or bbox is None:
        return None
    if abs(frame) > 10**9:
        return None
    return frame, bbox


# A letter, optionally in parentheses, optionally followed by ".", ")" or ":" and then
# (after whitespace) any text: "A", "a", "A.", "(A)", "A)", "A. the chair", "(B) left".
_CHOICE = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])[.):]?)(?:\s+.*)?$", re.DOTALL)


def parse_choice(answer: str) -> str | None:
    """Multiple-choice answer -> the option letter in upper case, or None.

    Accepted (after stripping whitespace and one pair of surrounding quotes): a single
    letter, optionally in parentheses or followed by ".", ")" or ":", and then optionally
    whitespace plus any text: "A", "b", "A.", "(A)", "C)", "A. the chair", "(B) left".
    Not accepted: "Apple", "A chair"-like words glued to the letter ("Ab"), empty text.
    """
    if not isinstance(answer, str) or len(answer) > MAX_SHORT_ANSWER_CHARS:
        return None
    text = answer.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    m = _CHOICE.match(text)
    if not m:
        return None
    letter = m.group(1) or m.group(2)
    # "A chair" (letter, space, word) reads as an article, not an option: demand punctuation
    # before free text unless the letter is in parentheses.
    if m.group(2) and len(text) > 1 and text[1].isspace():
        return None
    return letter.upper()


# A decimal number, then optionally a unit made of letters: "3", "-2.5", "1e-3", "3.5 m",
# "12 square meters", "4.", "7 chairs". (No nested quantifiers: no catastrophic backtracking.)
_NUMBER = re.compile(
    r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?:\s*[A-Za-z][A-Za-z0-9 ^²³.]{0,40})?$")


def parse_number(answer: str) -> float | None:
    """Numeric answer -> a finite float, or None.

    Accepted (at most MAX_SHORT_ANSWER_CHARS): a JSON / Python int or float ("3", "2.5",
    "1e-3"), a JSON string holding one ("\\"2.5\\""), or a decimal number followed by a unit
    word ("3.5 m", "12 square meters"). Booleans, NaN and infinities (e.g. "1e999") are not.
    """
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        return None
    if not isinstance(answer, str):
        return _finite_number(answer)
    if len(answer) > MAX_SHORT_ANSWER_CHARS:
        return None
    value = parse_json(answer)
    if isinstance(value, str):
        text = value.strip()                  # a JSON string: read the number inside it
    else:
        number = _finite_number(value)
        if number is not None:
            return number
        text = answer.strip()
    m = _NUMBER.match(text)
    if m is None:
        return None
    try:
        return _finite_number(float(m.group(1)))
    except (ValueError, OverflowError):
        return None


# --- lenient reading, for evaluation only ----------------------------------------------------
# The rewards above demand the `<think>..</think><answer>..</answer>` template (R_format) and a
# wholly valid answer. A published checkpoint (VG LLM) or a zero-shot Qwen answers without the
# tags, usually in a Markdown fence (VG LLM's targets: "```json\n[\n\t{...},\n\t{...}\n]```"),
# and the published evaluation scripts read such text. eval.py reads answers with the functions
# below, so such a model is scored on its boxes / frame / option, not on the template; the
# format rate (R_format) and every reward stay strict. Same safety as above: no eval, length and
# nesting caps, validated numbers.


def _first_fenced_block(text: str) -> str | None:
    """The inside of the first ```...``` block of `text` (language tag line dropped), or None."""
    start = text.find("```")
    end = text.find("```", start + 3) if start >= 0 else -1
    if end < 0:
        return None
    return _strip_fence(text[start:end + 3])


def parse_answer_lenient(text: str) -> str | None:
    """The answer text of a completion, read as the published evaluations read model output.

    In order: the answer of a well-formed `<think>T</think><answer>A</answer>` (as
    `parse_completion`); else the inside of a single `<answer>...</answer>` pair (a model that
    skips the think part); else the inside of the first Markdown code fence (```json ... ```);
    else the whole text. Always stripped; None only for a non-string or a text over
    MAX_COMPLETION_CHARS. Examples: '```json\\n{"frame": 2, ...}\\n```' -> '{"frame": 2, ...}';
    'B' -> 'B'; '<think>x</think><answer>B</answer>' -> 'B'. Not used by any reward.
    """
    if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
        return None
    answer = parse_completion(text)[1]
    if answer is not None:
        return answer
    s = text.strip()
    if s.count("<answer>") == 1 and s.count("</answer>") == 1:
        a_open, a_close = s.find("<answer>"), s.find("</answer>")
        if a_open < a_close:
            return s[a_open + len("<answer>"):a_close].strip()
    fenced = _first_fenced_block(s)
    return fenced.strip() if fenced is not None else s


def _json_lines(answer: str, keys: tuple[str, ...]) -> list[Any]:
    """Each line of `answer` naming one of `keys`, stripped of whitespace and commas, parsed
    (parse_json); lines that do not parse are skipped. VG LLM's evaluation reads its multi-line
    answers this way (src/lmms_eval/tasks/threedod/utils.py, threedod_process_results)."""
    values = []
    for line in answer.splitlines():
        line = line.strip().strip(",")
        if any(key in line for key in keys):
            value = parse_json(line)
            if value is not None:
                values.append(value)
    return values


def parse_boxes_lenient(answer: str | None) -> list[dict[str, Any]]:
    """Detection answer -> the valid boxes in it, for evaluation; [] when there are none.

    `parse_boxes` when the whole answer is valid. Otherwise the valid entries are kept and the
    invalid ones dropped: of the list if the answer parses as one, else of the lines that parse
    on their own (VG LLM's reading: one `{"label", "bbox_3d"}` per line, so a truncated
    multi-line answer keeps its complete lines). At most MAX_BOXES boxes.
    """
    if not isinstance(answer, str) or len(answer) > MAX_COMPLETION_CHARS:
        return []
    boxes = parse_boxes(answer)
    if boxes is not None:
        return boxes
    data = parse_json(answer)
    items = data if isinstance(data, list) else _json_lines(answer, ("bbox_3d", "label"))
    kept = [entry for entry in map(_valid_entry, items) if entry is not None]
    return kept[:MAX_BOXES]


def parse_grounding_lenient(answer: str | None) -> tuple[int, list[float]] | None:
    """Grounding answer -> (frame, box), for evaluation: `parse_grounding` of the whole answer,
    else of its first line that names "bbox_3d" (VG LLM's reading,
    src/lmms_eval/tasks/scanrefer/utils.py, scanrefer_process_results); None if neither parses."""
    if not isinstance(answer, str) or len(answer) > MAX_COMPLETION_CHARS:
        return None
    parsed = parse_grounding(answer)
    if parsed is not None:
        return parsed
    for line in answer.splitlines():
        if "bbox_3d" in line:
            return parse_grounding(line.strip())
    return None


# =============================================================================================
# 4. Metrics shared by the rewards and by evaluation
# =============================================================================================
# The paper's point is that the RL reward and the benchmark metric are the same computation;
# eval.py calls these two functions, so the two cannot drift apart.

# The VSI-Bench question types (which are multiple choice, which numeric) are part of the record
# format and live in data.py: MC_QUESTION_TYPES, NUMERIC_QUESTION_TYPES.

# VSI-Bench's MRA thresholds theta = 0.50, 0.55, ..., 0.95, kept as exact percentages so that
# the tolerances 1 - theta are the decimals 0.50, 0.45, ..., 0.05.
_MRA_PERCENT = tuple(range(50, 100, 5))


def norm_label(label: Any) -> str:
    """Labels compare after stripping whitespace and lower-casing ("Chair " == "chair")."""
    return str(label).strip().lower()


def match_detections(pred: Sequence[dict], gt: Sequence[dict],
                     iou_threshold: float = 0.25) -> tuple[int, int, int]:
    """Greedy one-to-one matching of predicted to ground-truth boxes -> (TP, FP, FN).

    Predictions are taken in output order; each takes, among the not-yet-matched ground-truth
    boxes with the same label, the one with the highest IoU (first in list order on ties), and
    is a true positive if that IoU is > iou_threshold (strictly); otherwise it is a false
    positive and matches nothing. FN = ground-truth boxes left unmatched. So a duplicate
    prediction of an already matched box is a false positive. Items are {"label", "bbox_3d"}.
    """
    # All IoUs of this answer at once (boxes.iou_matrix); the matching below only reads them.
    ious = iou_matrix([p.get("bbox_3d") for p in pred], [g.get("bbox_3d") for g in gt])
    gt_label = [norm_label(g.get("label")) for g in gt]
    used = [False] * len(gt)
    tp = fp = 0
    for i, p in enumerate(pred):
        p_label = norm_label(p.get("label"))
        best_iou, best_j = -1.0, -1
        for j in range(len(gt)):
            if used[j] or gt_label[j] != p_label:
                continue
            if ious[i, j] > best_iou:
                best_iou, best_j = float(ious[i, j]), j
        if best_j >= 0 and best_iou > iou_threshold:
            used[best_j] = True
            tp += 1
        else:
            fp += 1
    return tp, fp, len(gt) - tp


def mra(pred: float, gt: float) -> float:
    """Mean Relative Accuracy in [0, 1] (VSI-Bench): mean over theta in {0.50, ..., 0.95} of
    1[ |pred - gt| / |gt| <= 1 - theta ].

    A relative error exactly on a threshold counts as inside it (1e-9 slack for float
    rounding). gt == 0 has no relative error: we score exact match, 1 if pred == 0 else 0.
    Non-finite input scores 0.
    """
    pred, gt = float(pred), float(gt)
    if not (math.isfinite(pred) and math.isfinite(gt)):
        return 0.0
    if gt == 0.0:
        return 1.0 if pred == 0.0 else 0.0
    rel = abs(pred - gt) / abs(gt)
    hits = sum(rel <= (100 - p) / 100 + 1e-9 for p in _MRA_PERCENT)
    return hits / len(_MRA_PERCENT)
