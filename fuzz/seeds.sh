#!/usr/bin/env bash
# Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/) from the hand-written corpus
# of tests/http1_corpus (the ignored test `write_fuzz_seeds` in tests/http1_props.rs), then
# lists them. The seeds are committed; rerun this after changing that corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --test http1_props -- --ignored --exact write_fuzz_seeds
for t in fuzz/corpus/*/; do
    echo "$t: $(ls "$t" | wc -l) files, $(du -sh "$t" | cut -f1)"
done
