"""Runaway transcripts are cut back to their first pass; ordinary ones are left alone."""

from semedge.semcom.loops import cut_loop, runaway


def test_a_loop_is_cut_where_its_phrase_comes_back():
    loop = " ".join(["with the sinking heart"] * 20)
    assert runaway(loop)
    assert cut_loop(loop) == "with the sinking heart"
    varied = "Film is where the heart is. Film is where the Heart is. Film is Where the Heart is. " * 3
    assert cut_loop(varied) == "Film is where the heart is."
    late = "Please call me back. " + "Set fire to building. " * 12
    assert cut_loop(late) == "Please call me back. Set fire to building."


def test_ordinary_transcripts_are_unchanged():
    texts = ["", "no no no", "You will be given a post of trust and responsibility.",
             "The broken syntax and casual enunciation of conversational English, which one of the speakers "
             "called one of the hardest things to learn, is one of the reasons the test is hard."]
    for t in texts:
        assert not runaway(t)
        assert cut_loop(t) == t
