#!/usr/bin/env python3
"""Writes a sample CSV of purchases for Spillway: Date, Item Description, Quantity, Amount.

    python3 data/generate_data.py                      # 10,000 rows to data.csv
    python3 data/generate_data.py --rows 1000000 --out /tmp/big.csv

Some descriptions contain commas and quotes, so the file exercises CSV quoting the way
real exports do. Standard library only; the same --seed gives the same file.
"""

import argparse
import csv
import datetime
import random
import sys

ITEMS = [
    "Notebook",
    "Ballpoint pen, blue",
    "Stapler",
    'Monitor 27" 4K',
    "Desk lamp",
    "USB-C cable, 2 m",
    "Coffee beans (1 kg)",
    "Chair — ergonomic",
    "Paper, A4, 500 sheets",
    "Café au lait mug",
]


def positive_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_int, default=10_000, help="data rows to write (default 10000)")
    parser.add_argument("--out", default="data.csv", help="output path, or - for stdout (default data.csv)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    start = datetime.date(2024, 1, 1)
    out = sys.stdout if args.out == "-" else open(args.out, "w", newline="", encoding="utf-8")
    try:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["Date", "Item Description", "Quantity", "Amount"])
        for _ in range(args.rows):
            quantity = rng.randint(1, 20)
            writer.writerow(
                [
                    (start + datetime.timedelta(days=rng.randrange(366))).isoformat(),
                    rng.choice(ITEMS),
                    quantity,
                    f"{quantity * rng.uniform(0.5, 120):.2f}",
                ]
            )
    finally:
        if out is not sys.stdout:
            out.close()
    if args.out != "-":
        print(f"wrote {args.rows} rows to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
