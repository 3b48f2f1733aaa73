"""The grouped matmul demo section runs in quick mode and reports agreement with padding."""


def test_demo_section_reports_agreement_and_a_measured_ratio(grouped_matmul_library):
    from tfweave.ops import demo

    results = demo.run(quick=True)
    assert [r.what for r in results] == ["ragged vs padded rows agree (max |diff|)",
                                         "GroupedMatMul vs pad + BatchMatMulV2"]
    assert float(results[0].figure) < 1e-3
    assert results[1].figure.endswith("x") and float(results[1].figure[:-1]) > 0
