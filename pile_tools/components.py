"""The Pile's components and their upsampling epochs, and the names shards are written under."""

import json
import re
from pathlib import Path

from pile_tools.ground import InputError

# Epochs per component: the Pile paper (Gao et al., 2020), Table 1. A component's share of the training mix is
# proportional to epochs x size, which is how the paper's "effective size" is computed.
PILE_EPOCHS = {
    "Pile-CC": 1.0,
    "Github": 1.0,
    "Books3": 1.5,
    "FreeLaw": 1.5,
    "OpenSubtitles": 1.5,
    "BookCorpus2": 1.5,
    "PubMed Central": 2.0,
    "OpenWebText2": 2.0,
    "ArXiv": 2.0,
    "StackExchange": 2.0,
    "USPTO Backgrounds": 2.0,
    "PubMed Abstracts": 2.0,
    "DM Mathematics": 2.0,
    "Ubuntu IRC": 2.0,
    "EuroParl": 2.0,
    "HackerNews": 2.0,
    "YoutubeSubtitles": 2.0,
    "PhilPapers": 2.0,
    "NIH ExPorter": 2.0,
    "Enron Emails": 2.0,
    "Gutenberg (PG-19)": 2.5,
    "Wikipedia (en)": 3.0,
}


SPLITS = ("train", "valid", "test")


def split_weights(text, exactly_three: bool) -> list[float] | None:
    """train, valid and test weights from "995,4,1" (or gpt-neox's "995/4/1"); fewer than three are padded with 0
    as Megatron pads them unless `exactly_three`. None unless they are numbers >= 0 with a positive sum."""
    try:
        weights = [float(x) for x in str(text).replace("/", ",").split(",")]
    except ValueError:
        return None
    if exactly_three and len(weights) != 3:
        return None
    weights = (weights + [0.0, 0.0])[:3]
    return weights if min(weights) >= 0 and sum(weights) > 0 else None


def slugify(component: str) -> str:
    """File-name form of a component: 'Gutenberg (PG-19)' -> 'gutenberg-pg-19'."""
    slug = re.sub(r"[^a-z0-9]+", "-", component.lower()).strip("-")
    return slug or "unnamed"


def load_epochs(weights: str) -> tuple[dict[str, float], float | None]:
    """Epochs per component for `--weights`: ('pile' table, None) / ({}, 1.0) / (a JSON file's table, None).

    Returns the table and the epochs for every component (None: look it up in the table).
    """
    if weights == "pile":
        return dict(PILE_EPOCHS), None
    if weights == "none":
        return {}, 1.0
    path = Path(weights)
    if not path.is_file():
        raise InputError(f"--weights: {weights} is neither 'pile', 'none', nor an existing JSON file")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--weights: {weights} is not valid JSON ({e})") from None
    if not isinstance(table, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in table.values()
    ):
        raise InputError(
            f'--weights: {weights} must be a JSON object of component -> epochs >= 0, like {{"Github": 1.5}}'
        )
    return {str(k): float(v) for k, v in table.items()}, None


def epochs_for(component: str, table: dict[str, float], every: float | None, unknown: set[str]) -> float:
    """The epochs of one component; components missing from the table get 1.0 and are noted in `unknown`."""
    if every is not None:
        return every
    if component not in table:
        unknown.add(component)
        return 1.0
    return table[component]
