"""Every corpus program gives the same results, side effects and state under JANUS as eagerly.

The reference is the same program run eagerly (fresh globals each run); tf.function's verdicts
are measured by running it, and a few are pinned here because the README table rests on them.
"""

import pytest

from tfweave.janus import corpus

PROGRAMS = {p.name: p for p in corpus.PROGRAMS}

# Programs where staying eager is the right answer (JANUS must still match eager there): the
# value changes every call (random), each call makes new variables, or the code needs numpy
# methods / Python indexing on a value that varies, so no graph computes it.
MAY_STAY_EAGER = {"python_random", "creates_variable_each_call", "numpy_on_values",
                  "numpy_method_branch", "item_value", "int_float_tensor_arg",
                  "python_recursion_int"}


def test_corpus_has_at_least_forty_programs_with_unique_names():
    assert len(corpus.PROGRAMS) >= 40
    assert len(PROGRAMS) == len(corpus.PROGRAMS)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_janus_matches_eager(name):
    program = PROGRAMS[name]
    eager = corpus.run(program, "eager")
    janus = corpus.run(program, "janus")
    assert eager.error is None, f"the eager reference itself failed: {eager.error}"
    assert corpus.differences(eager, janus) == []
    stats = janus.janus_stats
    assert stats["calls"] >= 3
    if name not in MAY_STAY_EAGER:
        assert stats["graph_calls"] > 0, f"never ran a graph: {stats}"


@pytest.mark.parametrize("name", ["print_each_call", "append_global_list", "global_counter",
                                  "global_function_rebound", "object_attribute_mutated"])
def test_tf_function_loses_python_semantics_that_janus_keeps(name):
    program = PROGRAMS[name]
    eager = corpus.run(program, "eager")
    assert corpus.verdict(eager, corpus.run(program, "tf.function")) != "same"
    assert corpus.verdict(eager, corpus.run(program, "janus")) == "same"


def test_tf_function_fails_on_python_control_flow_over_tensor_values():
    eager = corpus.run(PROGRAMS["numpy_branch"], "eager")
    assert corpus.verdict(eager, corpus.run(PROGRAMS["numpy_branch"], "tf.function")) == "error"


def test_table_measures_tf_function_and_janus_for_each_program():
    chosen = [PROGRAMS["mlp_forward"], PROGRAMS["global_counter"], PROGRAMS["print_each_call"]]
    text = corpus.table(chosen)
    lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert lines[0].endswith("| same | same |")  # plain tensor code: tf.function is right
    assert lines[1].endswith("| wrong | same |")  # the counter only moves while tracing
    assert lines[2].endswith("| error | same |")  # .numpy() on a symbolic tensor
