"""SQuAD v1.1 JSON: every question with its context and gold answers, checked; a path may select articles by
index, in file order (`dev-v1.1.json#articles=0-37`). Windows, decoding and the metric: recipes/squad.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import BertpipeError

if TYPE_CHECKING:
    from recipes.tasks import TaskSpec


@dataclass
class SquadExample:
    id: str
    title: str
    context: str
    question: str
    answers: list[str]  # every gold answer (v1.1's dev set has up to six per question; training uses the first)
    starts: list[int]  # each answer's first character in `context`


def parse_articles(selection: str, count: int, file: Path) -> list[int]:
    """`0-37` or `0-9,20-29` (inclusive, 0-based, file order) as article indices, each checked against `count`."""
    chosen: list[int] = []
    for part in selection.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or not (high or low).isdigit() or int(high or low) < int(low):
            raise BertpipeError(f"{file}: article selection {selection!r} is not of the form 0-37 or 0-9,20-29")
        if int(high or low) >= count:
            raise BertpipeError(f"{file}: articles {part.strip()} asked for, the file has {count} (0-{count - 1})")
        chosen += range(int(low), int(high or low) + 1)
    return sorted(set(chosen))


def _selection(path: str | Path) -> tuple[Path, str | None]:
    """The file and the articles part of `file.json#articles=0-37`."""
    file, _, selection = str(path).partition("#")
    if not selection:
        return Path(file), None
    key, _, value = selection.partition("=")
    if key != "articles" or not value:
        raise BertpipeError(f"{path}: after '#' a SQuAD path takes articles=RANGES (e.g. #articles=0-37)")
    return Path(file), value


def read_squad(path: str | Path, spec: TaskSpec | None = None) -> list[SquadExample]:
    """Every question of a SQuAD v1.1 JSON file (or of its selected articles), checked."""
    file, selection = _selection(path)
    if not file.is_file():
        raise BertpipeError(f"{file}: file not found (set task.data_dir or DATA_DIR)")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BertpipeError(f"{file}: invalid UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise BertpipeError(f"{file}: not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BertpipeError(f"{file}: not SQuAD JSON (expected an object with a 'data' list of articles)")
    articles = data["data"]
    chosen = range(len(articles)) if selection is None else parse_articles(selection, len(articles), file)
    examples: list[SquadExample] = []
    seen: set[str] = set()
    for index in chosen:
        examples += _read_article(file, index, articles[index], seen)
    return examples


def _read_article(file: Path, index: int, article, seen: set[str]) -> list[SquadExample]:
    title = article.get("title", "") if isinstance(article, dict) else ""
    where = f"{file}: article {index}" + (f" ({title})" if isinstance(title, str) and title else "")
    if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
        raise BertpipeError(f"{where}: expected an object with a 'paragraphs' list")
    examples = []
    for number, paragraph in enumerate(article["paragraphs"]):
        context = paragraph.get("context") if isinstance(paragraph, dict) else None
        if not isinstance(context, str) or not context.strip() or not isinstance(paragraph.get("qas"), list):
            raise BertpipeError(f"{where}, paragraph {number}: expected a non-empty 'context' string and a 'qas' list")
        for position, qa in enumerate(paragraph["qas"]):
            qid = qa.get("id") if isinstance(qa, dict) else None
            if not isinstance(qid, str) or not qid:
                raise BertpipeError(f"{where}, paragraph {number}, question {position}: no 'id' string")
            at = f"{where}, question {qid}"
            if qa.get("is_impossible"):
                raise BertpipeError(f"{at}: is_impossible is set: SQuAD v2.0's unanswerable questions are not "
                                    "supported (use SQuAD v1.1)")
            if qid in seen:
                raise BertpipeError(f"{at}: the id is used twice")
            seen.add(qid)
            question, answers = qa.get("question"), qa.get("answers")
            if not isinstance(question, str) or not question.strip():
                raise BertpipeError(f"{at}: expected a non-empty 'question' string")
            if not isinstance(answers, list) or not answers:
                raise BertpipeError(f"{at}: expected a non-empty 'answers' list")
            texts, starts = [], []
            for n, answer in enumerate(answers):
                text = answer.get("text") if isinstance(answer, dict) else None
                start = answer.get("answer_start") if isinstance(answer, dict) else None
                if not isinstance(text, str) or not text.strip() or type(start) is not int:
                    raise BertpipeError(f"{at}: answer {n} needs a non-empty 'text' and an integer 'answer_start'")
                if context[start:start + len(text)] != text:
                    raise BertpipeError(f"{at}: answer {n} {text[:40]!r} is not at answer_start {start} of its "
                                        f"context (found {context[start:start + len(text)][:40]!r})")
                texts.append(text)
                starts.append(start)
            examples.append(SquadExample(qid, title, context, question.strip(), texts, starts))
    return examples
