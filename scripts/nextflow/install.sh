#!/usr/bin/env bash
# Put a real Nextflow on PATH without its self-installer: the pinned release (pom.xml beside this
# file) is resolved from Maven Central with Maven into ~/.cache/zseg/, and a small launcher runs
# nextflow.cli.Launcher on that classpath, offline (no plugin or self-update downloads).
# Sourced by scripts/env.sh; a machine without java or mvn keeps going without Nextflow (the
# Nextflow tests then say so and fail in CI, see tests/test_nextflow.py).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NXF_VERSION="$(sed -n 's:.*<nextflow.version>\(.*\)</nextflow.version>.*:\1:p' "$HERE/pom.xml")"
NXF_DIR="${ZSEG_NEXTFLOW_DIR:-$HOME/.cache/zseg/nextflow-$NXF_VERSION}"
if [ ! -x "$NXF_DIR/bin/nextflow" ]; then
    if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
        echo "zseg: no java or mvn here: Nextflow $NXF_VERSION not installed (apt-get install openjdk-17-jre-headless maven)" >&2
        return 0 2>/dev/null || exit 0
    fi
    echo "zseg: resolving Nextflow $NXF_VERSION from Maven Central into $NXF_DIR" >&2
    mkdir -p "$NXF_DIR/bin" "$NXF_DIR/home"
    if ! mvn -q -B -f "$HERE/pom.xml" -Dmaven.repo.local="$NXF_DIR/m2" dependency:build-classpath \
            -Dmdep.outputFile="$NXF_DIR/classpath.txt" >"$NXF_DIR/mvn.log" 2>&1; then
        echo "zseg: could not resolve Nextflow $NXF_VERSION (see $NXF_DIR/mvn.log)" >&2
        return 0 2>/dev/null || exit 0
    fi
    cat >"$NXF_DIR/bin/nextflow.tmp" <<LAUNCHER
#!/usr/bin/env bash
# Nextflow $NXF_VERSION from Maven Central (written by zseg's scripts/nextflow/install.sh)
export NXF_HOME="\${NXF_HOME:-$NXF_DIR/home}"
export NXF_OFFLINE="\${NXF_OFFLINE:-true}"
export NXF_DISABLE_CHECK_LATEST=true
export NXF_VER=$NXF_VERSION
opens=""
for p in java.lang java.io java.nio java.net java.util java.util.concurrent java.util.concurrent.atomic \\
         java.util.concurrent.locks java.util.regex sun.nio.ch sun.nio.fs sun.net.www.protocol.http \\
         sun.net.www.protocol.https sun.net.www.protocol.ftp sun.net.www.protocol.file jdk.internal.misc \\
         jdk.internal.vm; do
    opens="\$opens --add-opens=java.base/\$p=ALL-UNNAMED"
done
exec java \${NXF_OPTS:-} \$opens -Dcapsule.trampoline=false -cp "\$(cat "$NXF_DIR/classpath.txt")" nextflow.cli.Launcher "\$@"
LAUNCHER
    chmod +x "$NXF_DIR/bin/nextflow.tmp"
    mv "$NXF_DIR/bin/nextflow.tmp" "$NXF_DIR/bin/nextflow"
fi
export PATH="$NXF_DIR/bin:$PATH"
