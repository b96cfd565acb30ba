"""The Pile's component table against the Pile paper (Gao et al., 2020, Table 1), transcribed here on its own."""

import pytest

from pile_tools.components import PILE_EPOCHS

# Table 1: raw size (GiB), epochs, effective size (GiB), as printed.
TABLE_1 = {
    "Pile-CC": (227.12, 1.0, 227.12),
    "PubMed Central": (90.27, 2.0, 180.55),
    "Books3": (100.96, 1.5, 151.44),
    "OpenWebText2": (62.77, 2.0, 125.54),
    "ArXiv": (56.21, 2.0, 112.42),
    "Github": (95.16, 1.0, 95.16),
    "FreeLaw": (51.15, 1.5, 76.73),
    "StackExchange": (32.20, 2.0, 64.39),
    "USPTO Backgrounds": (22.90, 2.0, 45.81),
    "PubMed Abstracts": (19.26, 2.0, 38.53),
    "Gutenberg (PG-19)": (10.88, 2.5, 27.19),
    "OpenSubtitles": (12.98, 1.5, 19.47),
    "Wikipedia (en)": (6.38, 3.0, 19.13),
    "DM Mathematics": (7.75, 2.0, 15.49),
    "Ubuntu IRC": (5.52, 2.0, 11.03),
    "BookCorpus2": (6.30, 1.5, 9.45),
    "EuroParl": (4.59, 2.0, 9.17),
    "HackerNews": (3.90, 2.0, 7.80),
    "YoutubeSubtitles": (3.73, 2.0, 7.47),
    "PhilPapers": (2.38, 2.0, 4.76),
    "NIH ExPorter": (1.89, 2.0, 3.79),
    "Enron Emails": (0.88, 2.0, 1.76),
}


def test_the_transcription_is_consistent_with_itself():
    """Each row's effective size is its raw size times its epochs (to the paper's rounding), and the total is the
    paper's 1254.20 GiB: a typo in the epochs column above would show here."""
    for name, (raw, epochs, effective) in TABLE_1.items():
        assert raw * epochs == pytest.approx(effective, abs=0.02), name
    assert sum(e for _, _, e in TABLE_1.values()) == pytest.approx(1254.20, abs=0.05)


def test_the_epochs_are_the_papers():
    assert PILE_EPOCHS == {name: epochs for name, (_, epochs, _) in TABLE_1.items()}
