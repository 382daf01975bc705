"""Write a tiny stand-in for every evaluation data set, in its upstream format, as a data mirror.

The items are made up for the tests (none comes from the real data sets); the files have the
real ones' names, layout and fields, so `gptforge.download` finds them in a folder given as
GPTFORGE_DATA_MIRROR and the task readers parse them as they would parse the real files.

    python tests/make_eval_fixtures.py OUT_DIR
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


HELLASWAG_VAL = [
    {"ind": 1, "activity_label": "Baking bread", "ctx_a": "A man kneads dough on a table.",
     "ctx_b": "he", "ctx": "A man kneads dough on a table. he",
     "endings": ["puts the dough in a bowl to rise.", "throws the table out of the window.",
                 "sings to a passing cloud [title] loudly.", "paints the dough blue."],
     "split": "val", "split_type": "indomain", "label": 0, "source_id": "made-up-1"},
    {"ind": 2, "activity_label": "Home and Garden", "ctx_a": "[header] How to water a fern [title] Check the soil.",
     "ctx_b": "if it is dry,", "ctx": "",
     "endings": ["water it slowly.", "sell the house.", "eat the fern.", "call the moon."],
     "split": "val", "split_type": "zeroshot", "label": "0", "source_id": "made-up-2"},
    {"ind": 3, "activity_label": "Running", "ctx_a": "A woman ties her shoes.", "ctx_b": "she",
     "ctx": "", "endings": ["starts to run down the road.", "flies.", "melts.", "becomes a shoe."],
     "split": "val", "split_type": "indomain", "label": 0, "source_id": "made-up-3"},
]
HELLASWAG_TRAIN = [
    {"ind": 10 + i, "activity_label": f"Chore {i}", "ctx_a": f"Someone starts chore number {i}.",
     "ctx_b": "they", "ctx": "", "endings": ["finish it.", "stop.", "rest.", "leave."],
     "split": "train", "split_type": "indomain", "label": i % 4, "source_id": f"made-up-t{i}"}
    for i in range(6)
]


def _arc_row(qid: str, stem: str, texts: list[str], labels: str | list[str], answer: str) -> dict:
    return {"id": qid, "question": {"stem": stem, "choices": [{"text": t, "label": lab}
                                                           for t, lab in zip(texts, labels)]},
            "answerKey": answer}


ARC = {
    "Easy-Test": [
        _arc_row("E1", "Which of these is a liquid at room temperature?", ["water", "iron", "stone", "wood"],
                 "ABCD", "A"),
        _arc_row("E2", "What does a plant need to make food?", ["sunlight", "darkness", "sand"], "ABC", "A"),
        _arc_row("E3", "Which one is a planet?", ["Mars", "the Moon", "a comet", "a star"], "1234", "1"),
    ],
    "Easy-Train": [_arc_row(f"ET{i}", f"Made-up practice question {i}?", ["yes", "no", "maybe", "never"],
                            "ABCD", "ABCD"[i % 4]) for i in range(5)],
    "Challenge-Test": [
        _arc_row("C1", "Why does ice float on water?", ["it is less dense", "it is heavier", "it is hot",
                                                        "it is magnetic"], "ABCD", "A"),
        _arc_row("C2", "What gas do animals breathe out?", ["carbon dioxide", "gold", "helium café"],
                 "ABC", "A"),
    ],
    "Challenge-Train": [_arc_row(f"CT{i}", f"Made-up hard question {i}?", ["one", "two", "three", "four"],
                                 "ABCD", "ABCD"[i % 4]) for i in range(5)],
}

PIQA = {
    "valid": ([{"goal": "How do you open a jar?", "sol1": "Twist the lid.", "sol2": "Shout at the jar."},
               {"goal": "Dry wet socks", "sol1": "Put them in the freezer.", "sol2": "Hang them in the sun."},
               {"goal": "Cut paper", "sol1": "Use scissors.", "sol2": "Use a spoon."}], ["0", "1", "0"]),
    "train": ([{"goal": f"Made-up goal {i}", "sol1": f"first way {i}", "sol2": f"second way {i}"}
               for i in range(5)], [str(i % 2) for i in range(5)]),
}

WINOGRANDE = {
    "dev": [
        {"qID": "w1", "sentence": "The cup fell off the table because the _ was too close to the edge.",
         "option1": "cup", "option2": "table", "answer": "1"},
        {"qID": "w2", "sentence": "Anna gave Maria a book because _ had finished reading it.",
         "option1": "Anna", "option2": "Maria", "answer": "1"},
        {"qID": "w3", "sentence": "The bag was too small for the ball, so the _ had to be replaced.",
         "option1": "bag", "option2": "ball", "answer": "1"},
    ],
    "train_xl": [{"qID": f"t{i}", "sentence": f"Made-up sentence {i} where _ matters.",
                  "option1": "this", "option2": "that", "answer": str(1 + i % 2)} for i in range(5)],
}

LAMBADA = [
    {"text": "She opened the door and the cat walked in, so she fed the cat"},
    {"text": "He said hello to everyone in the room and then said goodbye to everyone"},
    {"text": "The rain kept falling all day long, and by night the river was full of rain"},
    {"text": "Tom played the piano every morning because he loved the piano"},
]

MMLU = {
    "astronomy": {
        "test": [["Which body does the Earth orbit?", "The Sun", "The Moon", "Mars", "Venus", "A"],
                 ["How many moons does the Earth have?", "None", "One", "Two", "Ten", "B"],
                 ["What is a light-year a unit of?", "Time", "Mass", "Distance", "Speed", "C"]],
        "dev": [[f"Made-up astronomy question {i}?", "a", "b", "c", "d", "ABCD"[i % 4]] for i in range(5)],
    },
    "college_biology": {
        "test": [["What carries oxygen in blood?", "Plasma", "Platelets", "Red cells, \"mostly\"", "Bone", "C"],
                 ["Where is DNA kept in a cell?", "The nucleus", "The wall", "The air", "The water", "A"]],
        "dev": [[f"Made-up biology question {i}?", "w", "x", "y", "z", "ABCD"[(i + 1) % 4]] for i in range(5)],
    },
}


def _zip(path: Path, members: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)


def _csv(rows: list[list[str]]) -> str:
    import csv

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_fixtures(out: str | Path) -> Path:
    """Write every task's fixture files under `out` at their cache paths; return `out`."""
    root = Path(out)
    for folder in ("hellaswag", "arc", "piqa", "winogrande", "lambada", "mmlu"):
        (root / "eval" / folder).mkdir(parents=True, exist_ok=True)
    (root / "eval/hellaswag/hellaswag_val.jsonl").write_text(_jsonl(HELLASWAG_VAL), encoding="utf-8")
    (root / "eval/hellaswag/hellaswag_train.jsonl").write_text(_jsonl(HELLASWAG_TRAIN), encoding="utf-8")
    _zip(root / "eval/arc/ARC-V1-Feb2018.zip",
         {f"ARC-V1-Feb2018-2/ARC-{key.split('-')[0]}/ARC-{key}.jsonl": _jsonl(rows) for key, rows in ARC.items()}
         | {"ARC-V1-Feb2018-2/README.txt": "made-up stand-in\n"})
    for split, (rows, labels) in PIQA.items():
        (root / f"eval/piqa/{split}.jsonl").write_text(_jsonl(rows), encoding="utf-8")
        (root / f"eval/piqa/{split}-labels.lst").write_text("".join(f"{x}\n" for x in labels), encoding="utf-8")
    _zip(root / "eval/winogrande/winogrande_1.1.zip",
         {f"winogrande_1.1/{split}.jsonl": _jsonl(rows) for split, rows in WINOGRANDE.items()})
    (root / "eval/lambada/lambada_test.jsonl").write_text(_jsonl(LAMBADA), encoding="utf-8")
    with tarfile.open(root / "eval/mmlu/data.tar", "w") as tar:
        for subject, splits in MMLU.items():
            for split, rows in splits.items():
                data = _csv(rows).encode("utf-8")
                info = tarfile.TarInfo(f"data/{split}/{subject}_{split}.csv")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_fixtures(sys.argv[1]))
