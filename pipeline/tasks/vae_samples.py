"""What a user sees of a sentence VAE: a samples report (Bowman et al. 2016; Leibowitz Table 2).

:func:`write_samples_report` writes ``vae_samples.txt`` (plain text, readable in the MLflow artifact
viewer) and ``vae_samples.html`` (one self-contained page of tables) with

- samples from the prior, each ``z`` decoded greedily and by sampling;
- reconstructions of the first sentences of a corpus: input | greedy (posterior mode) | sampled
  (``z ~ q(z|x)``, tokens sampled);
- the interpolation between two of those sentences (the first and the last): the input sentence A, the
  greedy decodings at ``t = 0 .. 1``, the input sentence B;
- the interpolation between two prior samples (greedy decodings).

Token ids become words through the vocabulary (index == id): a sentence stops at ``<eos>``; the tokens
``<bos>`` and ``<pad>`` are dropped by name (the padding id 0 is a real word in these corpora). All draws
come from one CPU generator seeded with ``seed``: the report is deterministic given the model and seed.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.vae.generation import (
    interpolate_prior,
    interpolate_sentences,
    prior_samples,
    reconstruct,
)
from pipeline.data.datasets import EOS
from pipeline.data.sentences import BOS, SentenceBatch, SentenceCorpus, bos_eos_ids

__all__ = ["SAMPLES_HTML", "SAMPLES_TEXT", "SamplesReport", "build_samples_report", "ids_to_text", "render_html",
           "render_text", "write_samples_report"]

SAMPLES_TEXT = "vae_samples.txt"
SAMPLES_HTML = "vae_samples.html"
_DROPPED = frozenset({BOS, "<pad>"})

Table = tuple[str, tuple[str, ...], list[tuple[str, ...]]]  # (title, header, rows)


@dataclass
class SamplesReport:
    """The report's tables, as text (every cell a string)."""

    title: str
    tables: list[Table]


def ids_to_text(ids: Iterable[int], vocabulary: Sequence[str]) -> str:
    """Token ids -> words joined by spaces: stops at ``<eos>``, drops ``<bos>`` / ``<pad>``."""
    words = []
    for i in ids:
        word = vocabulary[int(i)]
        if word == EOS:
            break
        if word not in _DROPPED:
            words.append(word)
    return " ".join(words)


def _first_sentences(source: SentenceCorpus | Iterable[SentenceBatch], n: int, bos_id: int) -> SentenceBatch:
    """The first ``n`` sentences of a corpus (in corpus order) or of batches (in batch order), as one batch."""
    if isinstance(source, SentenceCorpus):
        return source.batch(np.arange(min(n, len(source))))
    rows: list[torch.Tensor] = []
    for batch in source:
        rows.extend(batch.targets[: int(length), b] for b, length in enumerate(batch.lengths))
        if len(rows) >= n:
            break
    rows = rows[:n]
    steps = max((len(r) for r in rows), default=0)
    targets = torch.zeros(steps, len(rows), dtype=torch.long)
    mask = torch.zeros(steps, len(rows), dtype=torch.bool)
    for b, row in enumerate(rows):
        targets[: len(row), b], mask[: len(row), b] = row, True
    inputs = torch.cat([torch.full((1, len(rows)), bos_id, dtype=torch.long), targets[:-1]]) * mask
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return SentenceBatch(inputs=inputs, targets=targets, mask=mask, lengths=lengths)


@dataclass
class _Generation:
    """What every table of one report shares: the model, the decoding options, the seeded generator."""

    model: nn.Module
    vocabulary: Sequence[str]
    generator: torch.Generator
    max_length: int
    bos_id: int
    eos_id: int
    temperature: float

    @property
    def opts(self) -> dict[str, int]:
        return {"max_length": self.max_length, "bos_id": self.bos_id, "eos_id": self.eos_id}

    def text(self, ids: Iterable[int]) -> str:
        return ids_to_text(ids, self.vocabulary)

    def path_rows(self, t: list[float], tokens: list[list[int]]) -> list[tuple[str, ...]]:
        return [(str(i), f"{ti:.2f}", self.text(ids)) for i, (ti, ids) in enumerate(zip(t, tokens))]


def _prior_table(gen: _Generation, n: int) -> Table:
    prior = prior_samples(gen.model, n, gen.generator, temperature=gen.temperature, **gen.opts)
    rows = [(str(i + 1), gen.text(g), gen.text(s)) for i, (g, s) in enumerate(zip(prior.greedy, prior.sampled))]
    return "Samples from the prior", ("#", "greedy", "sampled"), rows


def _reconstruction_table(gen: _Generation, batch: SentenceBatch) -> Table:
    rec = reconstruct(gen.model, batch, generator=gen.generator, temperature=gen.temperature, **gen.opts)
    rows = [(str(i + 1), gen.text(x), gen.text(g), gen.text(s))
            for i, (x, g, s) in enumerate(zip(rec.inputs, rec.greedy, rec.sampled))]
    return "Reconstructions", ("#", "input", "greedy (posterior mode)", "sampled (z ~ q(z|x))"), rows


def _sentence_path_table(gen: _Generation, batch: SentenceBatch, steps: int) -> Table:
    """From the batch's first sentence (A) to its last (B): the row A, the greedy decodings, the row B."""
    last = batch.lengths.numel() - 1
    path = interpolate_sentences(gen.model, batch, 0, last, steps, **gen.opts)
    a, b = (gen.text(batch.targets[: int(batch.lengths[i]), i].tolist()) for i in (0, last))
    rows = [("A", "input", a), *gen.path_rows(path.t, path.tokens), ("B", "input", b)]
    return "Interpolation between two sentences (greedy)", ("step", "t", "sentence"), rows


def _prior_path_table(gen: _Generation, steps: int) -> Table:
    path = interpolate_prior(gen.model, steps, gen.generator, **gen.opts)
    rows = gen.path_rows(path.t, path.tokens)
    return "Interpolation between two prior samples (greedy)", ("step", "t", "sentence"), rows


def build_samples_report(
    model: nn.Module, source: SentenceCorpus | Iterable[SentenceBatch], vocabulary: Sequence[str], *,
    num_prior: int = 8, num_reconstructions: int = 8, interpolation_steps: int = 7, seed: int = 0,
    max_length: int = 50, temperature: float = 1.0,
) -> SamplesReport:
    """The report's tables (see the module docstring); :func:`write_samples_report` renders them."""
    bos_id, eos_id = bos_eos_ids(vocabulary)
    gen = _Generation(model, vocabulary, torch.Generator().manual_seed(seed), max_length, bos_id, eos_id,
                      temperature)
    tables = [_prior_table(gen, num_prior)] if num_prior > 0 else []
    batch = _first_sentences(source, num_reconstructions, bos_id)
    if batch.lengths.numel() >= 1:
        tables.append(_reconstruction_table(gen, batch))
    if batch.lengths.numel() >= 2:
        tables.append(_sentence_path_table(gen, batch, interpolation_steps))
    tables.append(_prior_path_table(gen, interpolation_steps))
    title = f"Sentence VAE samples (seed {seed}, max_length {max_length}, temperature {temperature:g})"
    return SamplesReport(title=title, tables=tables)


_NARROW = 12  # text layout: columns (all but the last) up to this wide are aligned side by side


def _text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Aligned columns when only the last column is wide (interpolations); else one block per row, the
    first cell then ``name: value`` lines (sentences side by side would make very long lines)."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    if all(w <= _NARROW for w in widths[:-1]):
        return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    indent, names = widths[0] + 2, [f"{name}:" for name in header[1:]]
    name_width = max(map(len, names))
    lines = []
    for row in rows:
        for i, (name, cell) in enumerate(zip(names, row[1:])):
            lead = row[0].ljust(indent) if i == 0 else " " * indent
            lines.append(f"{lead}{name.ljust(name_width)}  {cell}".rstrip())
    return lines


def render_text(report: SamplesReport) -> str:
    """Plain text: each table under its title (see :func:`_text_table`)."""
    lines = [report.title, ""]
    for title, header, rows in report.tables:
        lines += [f"== {title} ==", "", *_text_table(header, rows), ""]
    return "\n".join(lines)


_STYLE = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:2em}"
          "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#eee}")


def render_html(report: SamplesReport) -> str:
    """One self-contained HTML page (inline style, no scripts); every text is HTML-escaped."""
    esc = html.escape
    parts = [(f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(report.title)}</title>"
             f"<style>{_STYLE}</style></head><body>"), f"<h1>{esc(report.title)}</h1>"]
    for title, header, rows in report.tables:
        parts.append(f"<h2>{esc(title)}</h2>\n<table>")
        parts.append("<tr>" + "".join(f"<th>{esc(cell)}</th>" for cell in header) + "</tr>")
        parts.extend("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows)
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_samples_report(
    model: nn.Module, corpus_or_batches: SentenceCorpus | Iterable[SentenceBatch], vocabulary: Sequence[str],
    out_dir: str | Path, *, num_prior: int = 8, num_reconstructions: int = 8, interpolation_steps: int = 7,
    seed: int = 0, max_length: int = 50, temperature: float = 1.0,
) -> list[Path]:
    """Write ``vae_samples.txt`` and ``vae_samples.html`` into ``out_dir`` (created) and return their paths.

    ``vocabulary``: the prepared data's (``pipeline.data.load_vocab(data_dir)``, index == id); it must hold
    ``<eos>``. ``corpus_or_batches``: the sentences to reconstruct and interpolate, the first
    ``num_reconstructions`` of them (a corpus in its order; batches, e.g. ``evaluation_batches``, in theirs).
    """
    report = build_samples_report(
        model, corpus_or_batches, vocabulary, num_prior=num_prior, num_reconstructions=num_reconstructions,
        interpolation_steps=interpolation_steps, seed=seed, max_length=max_length, temperature=temperature,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_path, html_path = out / SAMPLES_TEXT, out / SAMPLES_HTML
    text_path.write_text(render_text(report), encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return [text_path, html_path]
