"""Apache Kafka's broker classpath, fetched once from Maven Central (``gpl kafka fetch``, ``make setup``).

The pom in ``deploy/kafka/pom.xml`` pins the version; ``mvn dependency:copy-dependencies`` copies the broker's
jars into ``<data_dir>/kafka/<version>/lib``. A marker file (``lib/.gpl-kafka``, holding the version) says the
copy is complete: an interrupted fetch is redone, a finished one is never repeated. Java (17 or newer: Kafka 4
brokers need it) runs the broker; Maven is needed only to fetch. Neither is needed by the embedded default.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

KAFKA_VERSION = "4.1.1"  # keep in step with kafka.version in deploy/kafka/pom.xml
POM = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "pom.xml"
MARKER = ".gpl-kafka"
MIN_JAVA = 17


class KafkaUnavailable(RuntimeError):
    """Apache Kafka cannot run here: the message is one line that says what to install or run."""


def lib_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "kafka" / KAFKA_VERSION / "lib"


def fetched(data_dir: Path) -> bool:
    marker = lib_dir(data_dir) / MARKER
    return marker.is_file() and marker.read_text().strip() == KAFKA_VERSION


def java_version(java: str) -> int:
    """The major version of a ``java`` binary (``java -version`` prints e.g. ``openjdk version "17.0.12"``)."""
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return 0
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def find_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise KafkaUnavailable(f"the Apache Kafka broker needs Java {MIN_JAVA} or newer: install a JDK (e.g. "
                               f"`apt-get install openjdk-17-jre-headless`), or use --broker embedded")
    if (v := java_version(java)) < MIN_JAVA:
        raise KafkaUnavailable(f"the Apache Kafka broker needs Java {MIN_JAVA} or newer, found Java {v} at {java}: "
                               f"install a newer JDK, or use --broker embedded")
    return java


def fetch(data_dir: Path, *, quiet: bool = True) -> Path:
    """The broker's ``lib`` directory, fetched with Maven on first use; raises :class:`KafkaUnavailable`."""
    lib = lib_dir(data_dir).resolve()  # Maven resolves a relative outputDirectory against the pom's folder
    if fetched(data_dir):
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaUnavailable(f"the Apache Kafka broker ({KAFKA_VERSION}) is fetched with Maven, not found: "
                               f"install it (e.g. `apt-get install maven`), then run `gpl kafka fetch`")
    if lib.exists():
        shutil.rmtree(lib)  # an interrupted copy
    lib.mkdir(parents=True)
    cmd = [mvn, "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={lib}",
           "-DincludeScope=runtime"]
    if quiet:
        cmd.insert(1, "-q")
    done = subprocess.run(cmd, capture_output=quiet, text=True)
    if done.returncode != 0:
        tail = (done.stdout or "")[-2000:] + (done.stderr or "")[-2000:] if quiet else ""
        raise KafkaUnavailable(f"`mvn dependency:copy-dependencies` on {POM} failed ({done.returncode}): "
                               f"{tail.strip() or 'see its output above'}")
    if not any(lib.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
        raise KafkaUnavailable(f"Maven finished but {lib} has no kafka_2.13-{KAFKA_VERSION}.jar")
    (lib / MARKER).write_text(KAFKA_VERSION + "\n")
    return lib


def ensure(data_dir: Path) -> tuple[str, Path]:
    """``(java, lib)`` to run the broker with: Java checked, the jars fetched if they are not yet."""
    java = find_java()
    return java, fetch(data_dir)
