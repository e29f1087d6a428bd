# Sourced by the scripts that drive a live `blocksnap serve`.
# serve_store N_SERVERS DISK_BYTES TOKEN: builds the release binary, makes a
# store in a temporary directory with N servers on random disks, starts
# `serve` on a free port, and sets $bin, $work, $store, $url. The server is
# stopped and the directory removed on exit.
serve_store() {
  local servers=$1 disk_bytes=$2 token=$3
  cargo build --release --quiet
  bin=$PWD/target/release/blocksnap
  work=$(mktemp -d)
  server_pid=
  trap 'serve_cleanup' EXIT
  store=$work/store
  "$bin" --store "$store" init --block-size 4K >/dev/null
  for id in $(seq "$servers"); do
    head -c "$disk_bytes" /dev/urandom >"$work/disk$id.img"
    "$bin" --store "$store" server add --id "$id" --name "server-$id" --disk "$work/disk$id.img" >/dev/null
  done
  BLOCKSNAP_API_TOKEN=$token "$bin" --store "$store" serve --listen 127.0.0.1:0 >"$work/out" 2>"$work/err" &
  server_pid=$!
  for _ in $(seq 100); do
    grep -q "listening on" "$work/out" 2>/dev/null && break
    sleep 0.1
  done
  url=$(sed -n 's/^listening on //p' "$work/out")
  [ -n "$url" ] || { echo "server did not start:"; cat "$work/err"; exit 1; }
}

serve_cleanup() {
  [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
