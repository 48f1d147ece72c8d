"""The tables bench_moe.py prints from its results (the JSON holds the same numbers and more)."""

from __future__ import annotations

from typing import Any


def render(results: list[dict], machine: dict[str, Any]) -> str:
    def ms(s: float) -> str:
        return f"{s * 1e3:.1f}"

    lines = [
        f"moe_dist vs DeepSpeed MoE layer | {machine['device']} ({machine['cpu_model']}) | torch {machine['torch']} "
        f"| deepspeed {machine['deepspeed']} | world {machine['world']} | {machine['threads_per_rank']} thread(s)/rank "
        f"| load average at start / end: {machine['loadavg_start']:.2f} / {machine['loadavg_end']:.2f} "
        f"| source {machine['moe_dist_source']}",
        "",
        "| config | impl | median fwd+bwd ms | best ms | tokens/s/rank | useful GFLOP/s/rank | % of GEMM rate | peak MiB/rank "
        "| a2a B/token (measured / formula) | kept copies | page faults/step | |y - y_ds|max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    impl_names = ("moe_dist", "moe_dist_chunks", "deepspeed")
    for r in results:
        for name in impl_names:
            if name not in r:
                continue
            e = r[name]
            diff = e.get("max_abs_diff_vs_deepspeed")
            lines.append(
                f"| {r['name']} | {name} | {ms(e['median_s'])} | {ms(e['min_s'])} | {e['tokens_per_s']:,.0f} | "
                f"{e['useful_flops_per_s'] / 1e9:.1f} | {100 * e['gemm_fraction']:.0f}% | "
                f"{e['peak_mem_bytes'] / 2**20:.0f} | {e['a2a_payload_bytes_per_token']:,.0f} / "
                f"{e['a2a_formula_bytes_per_token']:,.0f} | {100 * e['kept_copies_fraction']:.1f}% | "
                f"{e['minor_page_faults_per_step']:,.0f} | "
                f"{'' if diff is None else f'{diff:.1e}'} |"
            )
    lines += [
        "",
        "| config | moe_dist / DeepSpeed tokens/s | moe_dist / DeepSpeed peak mem | DeepSpeed capacity (rows/expert/rank) "
        "| max/mean expert load |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        md, dsr = r["moe_dist"], r["deepspeed"]
        lines.append(
            f"| {r['name']} | {md['tokens_per_s'] / dsr['tokens_per_s']:.2f}x | "
            f"{md['peak_mem_bytes'] / dsr['peak_mem_bytes']:.2f}x | {dsr.get('capacity', '')} | "
            f"{md['max_over_mean_expert_load']:.2f} |"
        )
    chunked = [r for r in results if "moe_dist_chunks" in r]
    if chunked:
        lines += [
            "",
            "Chunked EP pipeline (model.moe.overlap_chunks): exchange hidden = (moe_dist − chunked step time) / "
            "(2 × the forward's all-to-all time of a plain step).",
            "",
            "| config | moe_dist ms | chunked ms | chunked / DeepSpeed tokens/s | exchange hidden |",
            "|---|---|---|---|---|",
        ]
        for r in chunked:
            md, ch, dsr = r["moe_dist"], r["moe_dist_chunks"], r["deepspeed"]
            lines.append(
                f"| {r['name']} | {ms(md['median_s'])} | {ms(ch['median_s'])} | "
                f"{ch['tokens_per_s'] / dsr['tokens_per_s']:.2f}x | {100 * ch['exchange_hidden_fraction']:.0f}% |"
            )
    lines += [
        "",
        "| config | GEMM rows/expert | GEMM GFLOP/s/rank (median / best) | a2a MiB sent per call | a2a GB/s/rank |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        f = r["floors"]
        a2a = (
            f"{f['a2a_bytes'] / 2**20:.1f} | {f['a2a_bytes_per_s'] / 1e9:.2f}"
            if "a2a_bytes" in f
            else "- | -"
        )
        lines.append(
            f"| {r['name']} | {f['gemm_rows_per_expert']} | {f['gemm_flops_per_s'] / 1e9:.1f} / "
            f"{f['gemm_best_flops_per_s'] / 1e9:.1f} | {a2a} |"
        )
    lines += [
        "",
        "moe_dist forward-only breakdown (ms; median over steps, mean over ranks). exchange = the "
        "all_to_all_single calls after a barrier; wait = that barrier (waiting for the slower rank). "
        "GEMM@floor = the forward's expert FLOPs at the measured GEMM rate; the last column is everything "
        "but that and the exchange.",
        "",
        "| config | route | permute | wait | exchange | experts | combine | total fwd | GEMM@floor "
        "| route+permute+combine | not GEMM@floor, not exchange |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r["moe_dist"]["phases_fwd_s"]
        glue = (p["route"] + p["permute"] + p["combine"]) / p["total"]
        rest = 1 - (p["expert_gemm_at_floor"] + p["exchange"]) / p["total"]
        lines.append(
            f"| {r['name']} | {ms(p['route'])} | {ms(p['permute'])} | {ms(p['wait'])} | {ms(p['exchange'])} | "
            f"{ms(p['experts'])} | {ms(p['combine'])} | {ms(p['total'])} | {ms(p['expert_gemm_at_floor'])} | "
            f"{100 * glue:.0f}% | {100 * rest:.0f}% |"
        )
    return "\n".join(lines)
