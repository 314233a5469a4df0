"""The HTTP API's request and response bodies (pydantic: validation, 422s and the OpenAPI schema from one place).

`POST /predict` takes `{"inputs": X}` with X one input or a list of them — the convention of Hugging Face's
inference API — where an input is a text, a pair `{"a": ..., "b": ...}` (sentence-pair tasks) or
`{"question": ..., "context": ...}` (span QA). Which one a run takes is `GET /metadata`'s `input`. The answer
is always `{"results": [...]}`, one result per input, in order.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from recipes.predict import shape_of

EXPECTED = 'expected a text, a pair {"a", "b"} or {"question", "context"}'


class Pair(BaseModel):
    """Two texts for a sentence-pair task (entailment, paraphrase, similarity)."""

    model_config = ConfigDict(extra="forbid")
    a: StrictStr
    b: StrictStr


class QuestionContext(BaseModel):
    """A question and the passage its answer is a span of."""

    model_config = ConfigDict(extra="forbid")
    question: StrictStr
    context: StrictStr


Input = StrictStr | Pair | QuestionContext


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"inputs": "a gorgeous, witty, seductive movie."},
        {"inputs": ["a gorgeous, witty, seductive movie.", "a dull mess."]},
        {"inputs": {"a": "A man is playing a guitar.", "b": "A person plays an instrument."}},
    ]})
    inputs: Input | list[Input] = Field(description="one input or a list of them: texts, pairs {a, b} or "
                                                    "{question, context}, as GET /metadata's `input` says")
    pretokenized: bool = Field(False, description="tagging: the words are split on whitespace only")

    @field_validator("inputs", mode="before")
    @classmethod
    def _known_shapes(cls, value: Any) -> Any:
        """One line naming the first input of no known shape (pydantic's union errors list every member)."""
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            where = f"[{i}]" if isinstance(value, list) else ""
            if shape_of(item) is None:
                raise ValueError(f"{where}: {_what(item)}, {EXPECTED}")
            if isinstance(item, dict):
                for key, text in item.items():
                    if not isinstance(text, str):
                        raise ValueError(f"{where}.{key}: {_what(text)}, expected a text")
        return value

    def items(self) -> list[str | dict]:
        """The inputs as a list of str or dict, the form recipes.predict.Predictor checks."""
        inputs = self.inputs if isinstance(self.inputs, list) else [self.inputs]
        return [x if isinstance(x, str) else x.model_dump() for x in inputs]


class Result(BaseModel):
    """One input's answer; which keys it has depends on the run's task kind."""

    model_config = ConfigDict(extra="allow")
    text: str | None = Field(None, description="the input text as read (stripped); span: the answer")
    text_a: str | None = Field(None, description="a pair task: the pair's first text as read (stripped)")
    text_b: str | None = Field(None, description="a pair task: its second text")
    label: str | None = Field(None, description="classify: the most probable label")
    probability: float | None = Field(None, description="classify: the label's probability")
    score: float | None = Field(None, description="regress: the score (STS-B: similarity, 0-5); span: the answer's "
                                "start plus end logit")
    question: str | None = Field(None, description="span: the question as read")
    start: int | None = Field(None, description="span: the answer's first character in the context")
    end: int | None = Field(None, description="span: the character after the answer")
    probabilities: dict[str, float] | list[float | None] | None = Field(
        None, description="classify: every label's probability; tag: each tag's (null for words cut off)")
    words: list[str] | None = Field(None, description="tag: the words tagged")
    tags: list[str] | None = Field(None, description="tag: one tag per word")
    translation: str | None = Field(None, description="translate: the translation")
    truncated: bool = Field(description="the input was longer than the run's max_len pieces and was cut")


class PredictResponse(BaseModel):
    results: list[Result]


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong with the request, in one line")
    status: int


def _what(value: Any) -> str:
    """What a JSON value is, without repeating it."""
    if isinstance(value, dict):
        return f"an object with keys {', '.join(map(repr, value)) or '(none)'}"
    return {bool: "a boolean", int: "a number", float: "a number", type(None): "null", list: "a list",
            str: "a text"}.get(type(value), type(value).__name__)
