"""The README tables of `benchmarks/results/ssr_cost.json` (`ssr_cost.py --markdown`)."""

from __future__ import annotations

from typing import Any


def markdown(results: dict[str, Any]) -> str:
    """The README tables of every part and device in `results`."""
    lines: list[str] = []
    for r in results.get("inference", {}).values():
        lines += [
            f"**(a) Inference, exported student** ({r['device']}, MiT {r['model']}, "
            f"{r['input'][0]}x{r['input'][1]} input, median of {r['reps']}, interleaved)",
            "",
            "| model | latency (ms) | CPU time (ms) | parameters |",
            "|---|---:|---:|---:|",
        ]
        for name in ("daformer", "ssr"):
            lines.append(
                f"| {name} | {r[name]['time_ms']:.1f} | {r[name]['cpu_time_ms']:.1f} | "
                f"{r['files'][name]['params']:,} |"
            )
        iqr = r["time_ratio_iqr"]
        lines += [
            f"| **ssr / daformer** | **{r['time_ratio']:.3f}** (IQR {iqr[0]:.3f}-{iqr[1]:.3f}) | "
            f"{r['cpu_time_ratio']:.3f} | identical keys and shapes: "
            f"{r['identical_keys_and_shapes']} |",
            "",
            f"GFLOPs per image: daformer {r['gflops']['daformer']}, ssr {r['gflops']['ssr']}; "
            f"ratio of medians {r['ratio_of_medians']:.3f}, of minima {r['ratio_of_minima']:.3f} "
            f"({r['threads']} thread(s)).",
            "",
        ]
    for r in results.get("fusion", {}).values():
        lines += [
            f"**(b) Fusion, SDPA vs explicit attention** ({r['device']}, {r['dtype']}, batch "
            f"{r['batch']}, {r['crop']}² crop, forward + backward)",
            "",
            "| stage | queries x keys | explicit / sdpa memory | explicit / sdpa time |",
            "|---|---|---:|---:|",
        ]
        for s in r["per_stage"]:
            lines.append(
                f"| {s['stage']} | {s['queries']} x {s['keys']} | {s['memory_ratio']} | "
                f"{s['time_ratio']} |"
            )
        a = r["all_stages"]
        lines += [f"| all {a['stages']} | one graph | {a['memory_ratio']} | — |", ""]
    for r in results.get("train_step", {}).values():
        lines += [
            f"**(c) One training step** ({r['device']}, tiny MiT + tiny SAM, batch {r['batch']}, "
            f"{r['crop'][0]}x{r['crop'][1]} crops, median of {r['steps']['daformer']['n']})",
            "",
            "| method | step (ms) | vs. its baseline |",
            "|---|---:|---:|",
        ]
        base = {"ssr": "daformer", "mic_ssr": "mic"}
        for name, s in r["steps"].items():
            method = name.split(" ")[0]
            rel = (
                f"{s['time_ms'] / r['steps'][base[method]]['time_ms']:.2f}x"
                if method in base
                else "1.00x"
            )
            lines.append(f"| {name} | {s['time_ms']:.1f} | {rel} |")
        sam = r["sam_features_ms"]
        lines += [
            "",
            f"SAM features per step: online {sam['online']:.1f} ms, cached {sam['cached']:.1f} ms "
            "(read + crop + ClassMix blend).",
            "",
            "| cached vs online SAM features (tiny SAM) | n | rel. error | cosine |",
            "|---|---:|---:|---:|",
        ]
        for key, v in r["cache_vs_online"].items():
            lines.append(f"| {key} | {v['n']} | {v['rel_error']:.2g} | {v['cosine']:.3f} |")
        est = r["paper_scale_vit_b"]
        src, tgt = (v for k, v in est.items() if isinstance(v, dict))
        lines += [
            "",
            f"Paper scale (vit_b, {est['dim']}-d tokens of {est['token_px']} px, fp16): "
            f"{src['MiB_per_image_fp16']} MiB per GTA5 image ({src['tokens'][0]}x"
            f"{src['tokens'][1]} tokens), {tgt['MiB_per_image_fp16']} MiB per Cityscapes image; "
            f"{est['GiB_total_fp16']} GiB in all; building it runs SAM on "
            f"{est['sam_tiles_to_build']:,} tiles vs {est['sam_crops_per_40k_run_online']:,} "
            "crops online in one 40k-step run. Online SAM costs "
            f"{est['online_sam_tflops_per_step']} TFLOPs per step (forward, 4 crops at 1024²) = "
            f"{est['online_sam_per_step_in_student_crop_forwards']} MiT-B5 + DAFormer forwards "
            "of a 512² crop; the cache replaces it with reading 4 crop windows.",
            "",
        ]
    return "\n".join(lines)
