"""The ES-evaluation throughput benchmark runs both paths and reports their ratio."""

from learned_opt.bench.population_speed import measure_population_throughput


def test_population_throughput_measures_both_paths(need_data):
    result = need_data(lambda: measure_population_throughput("meta_train_general", tasks=1, members=2, steps=3,
                                                              repeats=1))
    assert set(result["steps_per_s"]) == {"batched", "loop"}
    assert all(v > 0 for v in result["steps_per_s"].values()) and result["ratio"] > 0


def test_bad_suite_is_one_line_not_a_traceback(capsys):
    from learned_opt.bench.population_speed import main

    assert main(["--suite", "no-such-suite", "--tasks", "1"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no-such-suite" in err and "Traceback" not in err
