#!/usr/bin/env bash
# Regenerates this fixture with the real img2dataset (not a test dependency): 24 URLs served
# from localhost (3 answer 404, 3 are not images, the rest JPEG/PNG in RGB, L, CMYK, P, RGBA),
# downloaded as LAION-style webdataset shards and COYO-style parquet shards.
#   python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset==1.47.0 pillow
#   tests/golden/img2dataset/make.sh /tmp/i2d/bin
set -euo pipefail
BIN=${1:?path to the bin/ of a venv with img2dataset}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
"$BIN/python" "$HERE/make_inputs.py" "$WORK"
(cd "$WORK" && exec "$BIN/python" -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1) &
SERVER=$!
sleep 1
export NO_ALBUMENTATIONS_UPDATE=1
rm -rf "$HERE/laion_wds" "$HERE/coyo_parquet"
common=(--input_format parquet --processes_count 1 --thread_count 4 --number_sample_per_shard 12
        --enable_wandb False --distributor multiprocessing --image_size 64 --resize_only_if_bigger True)
"$BIN/img2dataset" --url_list "$WORK/laion.parquet" --url_col URL --caption_col TEXT \
  --output_format webdataset --output_folder "$HERE/laion_wds" --resize_mode keep_ratio \
  --save_additional_columns '["similarity","punsafe","pwatermark","NSFW","LICENSE"]' "${common[@]}"
"$BIN/img2dataset" --url_list "$WORK/coyo.parquet" --url_col url --caption_col text \
  --output_format parquet --output_folder "$HERE/coyo_parquet" --resize_mode center_crop \
  --save_additional_columns '["id","clip_similarity_vitl14","aesthetic_score_laion_v2","watermark_score"]' \
  "${common[@]}"
