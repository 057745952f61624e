# The mirror as a container: `docker build -t mirror .` with internet access, or `scripts/build-image`
# (wheels built on the host first, for machines whose containers cannot reach the package index).
FROM debian:bookworm-slim

# Debian's Python: one interpreter the distribution patches, no second toolchain in the image. This layer
# does not depend on the project, so rebuilds after a code change start below it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/mirror \
 && useradd --system --uid 10001 --home-dir /var/lib/mirror --create-home mirror \
 && mkdir -p /var/lib/mirror/data /etc/mirror \
 && chown -R mirror:mirror /var/lib/mirror

# The build context: the project, and optionally wheels/ made by `pip wheel` on the host. The s3 extra is in:
# a node of a cluster on one bucket runs this same image.
COPY . /src
RUN if ls /src/wheels/*.whl >/dev/null 2>&1; then \
        /opt/mirror/bin/pip install --no-cache-dir --no-index --find-links /src/wheels 'mirror[s3]'; \
    else \
        /opt/mirror/bin/pip install --no-cache-dir '/src[s3]'; \
    fi \
 && rm -rf /src

ENV PATH=/opt/mirror/bin:$PATH \
    PYTHONUNBUFFERED=1
# Set MIRROR_CONFIG=/etc/mirror/config.yaml (and mount it) to replace the embedded defaults; without it the
# defaults apply, with storage in ./data = the volume below.
USER mirror
WORKDIR /var/lib/mirror
VOLUME ["/var/lib/mirror/data"]
EXPOSE 5000
# `mirror healthcheck` asks /livez on the port the configuration listens on.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["mirror", "healthcheck"]
# SIGTERM drains: in-flight requests get the shutdown grace, then the cache index is closed cleanly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mirror"]
CMD ["serve"]
