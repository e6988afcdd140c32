"""Packed pre-training sequences: documents are concatenated and cut into rows; with learned
flags, context-only tokens get the -100 label and the rows still line up with their labels."""

import numpy as np
import pytest

from speechlm.data.packed import PackedSequences, pack_documents


def test_documents_are_cut_into_full_rows_and_every_token_is_learned():
    rows = pack_documents([[1, 5, 9, 2], [1, 7, 2], [1, 8, 8, 2]], seq_len=4)
    assert rows.tolist() == [[1, 5, 9, 2], [1, 7, 2, 1]]  # the partial third row is dropped
    data = PackedSequences([rows])
    assert len(data) == 2 and data[1] == {"input_ids": [1, 7, 2, 1], "labels": [1, 7, 2, 1]}


def test_context_only_tokens_are_not_learned_across_row_boundaries():
    docs = [[10, 11, 12, 5, 2], [10, 13, 6, 7, 2]]  # units 10..13, then text and EOS
    learned = [[False, False, False, True, True], [False, False, True, True, True]]
    rows, labels = pack_documents(docs, seq_len=3, learned=learned)
    assert rows.tolist() == [[10, 11, 12], [5, 2, 10], [13, 6, 7]]
    assert labels.tolist() == [[-100, -100, -100], [5, 2, -100], [-100, 6, 7]]
    data = PackedSequences([rows[:2], rows[2:]], labels=[labels[:2], labels[2:]])
    assert data[2] == {"input_ids": [13, 6, 7], "labels": [-100, 6, 7]}
    assert data[1]["labels"] == [5, 2, -100]


def test_flags_and_labels_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="3 tokens has 2 learned flags"):
        pack_documents([[1, 2, 3]], seq_len=2, learned=[[True, True]])
    with pytest.raises(ValueError, match="shape of the packed blocks"):
        PackedSequences([np.zeros((2, 4), dtype=np.int64)],
                        labels=[np.zeros((1, 4), dtype=np.int64)])
