"""scripts/bench_decode.py: the verdict lines a deployer reads, with each one's range over rounds."""

from tests.helpers import load_script


def test_verdicts_compare_medians_and_show_the_per_round_range(capsys):
    bench = load_script("bench_decode")
    bench.print_verdicts({
        (1, "ar"): [1.0, 1.0, 1.0],
        (1, "self_spec auto ngram"): [1.6, 1.7, 1.5],
        (1, "self_spec+lora auto ngram"): [1.8, 1.6, 1.9],
        (8, "ar"): [1.0, 1.0, 1.0],
        (8, "self_spec auto"): [0.97, 0.99, 1.02],
    })
    batch1, batch8 = capsys.readouterr().out.splitlines()
    # medians 1.8 / 1.6; round by round 1.125, 0.94 and 1.27: a median above 1 that one round contradicts
    assert "best with adapter / best without: 1.12 (self_spec+lora auto ngram vs self_spec auto ngram; rounds " \
           "0.94-1.27)" in batch1
    assert "slowest auto row self_spec auto ngram 1.60x AR (rounds 1.50-1.70)" in batch1
    assert batch8 == ("batch 8: best self-spec self_spec auto 0.99x AR; slowest auto row self_spec auto 0.99x AR "
                      "(rounds 0.97-1.02)")
