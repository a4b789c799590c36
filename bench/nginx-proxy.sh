# Sourced by bench/proxy-overhead.sh and bench/proxy-instructions.sh, not run: the nginx
# they compare trimtab with, defined once so that both measure the same proxy.
#
#   nginx_proxy_conf FILE WORK PORT BACKEND_PORT FORWARDED [MAIN_DIRECTIVES]
#
# Writes to FILE an nginx config with one worker that listens on 127.0.0.1:PORT and
# proxies to 127.0.0.1:BACKEND_PORT over a keep-alive upstream pool, its pid and error
# log in WORK. FORWARDED is `none` (nginx's default: no forwarding fields) or `all`
# (the four trimtab adds: X-Forwarded-For, -Proto, -Host and Forwarded).
# MAIN_DIRECTIVES go to the main context (e.g. `master_process off;`).
nginx_proxy_conf() {
  local file=$1 work=$2 port=$3 backend=$4 forwarded=$5 main=${6:-} fields
  case $forwarded in
    none) fields="" ;;
    all)
      fields='proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header Forwarded "for=$remote_addr;host=\"$http_host\";proto=$scheme";'
      ;;
    *) echo "forwarding fields: expected none or all, not $forwarded" >&2; return 2 ;;
  esac
  cat >"$file" <<CONF
worker_processes 1; daemon off; $main pid $work/nginx.pid; error_log $work/nginx.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$backend; keepalive 256; }
  server { listen 127.0.0.1:$port;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
      $fields } } }
CONF
}
