#!/usr/bin/env python3
"""The deployed caller: drives latc the way StarlingX's build-image does.

Written from the protocol document's description of build-image ("The
deployed caller"): the same commands, the same parsing of their output, the
same sleeps, `tail -f` on the log, and the same signal handling. Only the
image preparation before the build is left out: the image YAML is copied
from BASE_YAML, as build-image copies its base YAML.

Environment:
  LAT_ROOT           the workspace (default /localdisk); exported as WORKSPACE_DIR
  BASE_YAML          the image YAML to build (required)
  LATC               the latc to run (default: latc on PATH)
  DEPLOY_MANIFEST    if set, where to write what deploy/ held when its
                     `chown -R` ran (name and size per line)
  NO_CHOWN=1         leave out the `chown -R` (build-image runs it with sudo)

Exit status: 0 if it saw the success line, 1 otherwise (as build-image).
"""

import os
import shutil
import signal
import subprocess
import sys
import time

LAT_ROOT = os.environ.get("LAT_ROOT", "/localdisk")
LATC = os.environ.get("LATC", "latc")
WAIT_TIME_BEFORE_CHECKING_LOG = 2
MAX_WAIT_LAT_TIME = 300


def say(level, msg):
    print(f"build-image {level}: {msg}", flush=True)


def stop_latd():
    os.system(f"{LATC} stop")
    time.sleep(2)
    try:
        status = subprocess.check_output(f"{LATC} status", shell=True).decode()
    except Exception as e:  # build-image logs the exception and goes on
        say("error", str(e))
    else:
        if status and "idle" in status:
            say("info", "Successfully stopped latd")
            return
    say("info", "Failed to stop latd, you may have to login pkgbuilder to kill")


def is_latd_running():
    running = False
    try:
        status = subprocess.check_output(f"{LATC} status", shell=True).decode()
    except Exception as e:
        say("error", str(e))
    else:
        if status:
            if "lat_status: idle" in status:
                say("debug", "latd is idle")
            elif "lat_status: busy" in status:
                say("debug", "latd is running")
                running = True
    return running


def user_signal_handler(signum, frame):
    stop_latd()
    sys.exit(1)


def clean_old_outputs(lat_root):
    os.system("rm -rf " + lat_root + "/workdir")
    os.system("rm -rf " + lat_root + "/sub_workdir")
    for cached in ("lat.yaml", "lat-initramfs.yaml"):
        os.system("rm -f " + os.path.join(lat_root, cached))
    deploy_dir = os.path.join(lat_root, "deploy")
    if not os.path.isdir(deploy_dir):
        return
    patch_output = os.path.abspath(os.path.join(deploy_dir, "patch_output"))
    for entry in os.listdir(deploy_dir):
        full = os.path.join(deploy_dir, entry)
        if os.path.abspath(full) == patch_output:
            continue
        os.system("rm -rf " + full)
    os.system("chmod g+w " + deploy_dir)


def write_manifest(deploy_dir):
    path = os.environ.get("DEPLOY_MANIFEST")
    if not path:
        return
    with open(path, "w") as f:
        if os.path.isdir(deploy_dir):
            for name in sorted(os.listdir(deploy_dir)):
                full = os.path.join(deploy_dir, name)
                f.write(f"{name} {os.path.getsize(full)}\n")


def main():
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, user_signal_handler)
    clean_old_outputs(LAT_ROOT)
    os.environ["WORKSPACE_DIR"] = LAT_ROOT
    lat_yaml = os.path.join(LAT_ROOT, "lat.yaml")
    shutil.copyfile(os.environ["BASE_YAML"], lat_yaml)

    ret = 1
    os.system(" ".join([f"{LATC} --file=" + lat_yaml, "build"]))
    lat_log = os.path.join(LAT_ROOT, "log/log.appsdk")
    time.sleep(WAIT_TIME_BEFORE_CHECKING_LOG)
    time_counter = 0
    latd_run = False
    while not os.path.exists(lat_log):
        latd_run = is_latd_running()
        if not latd_run or time_counter >= MAX_WAIT_LAT_TIME:
            break
        time.sleep(1)
        time_counter += 1
    if not os.path.exists(lat_log):
        if time_counter >= MAX_WAIT_LAT_TIME:
            say("error", "The wait for %s has timed out" % lat_log)
            say("error", "There is issue with latd, please check")
        elif not latd_run:
            say("error", "latd is not running, please check")
        sys.exit(ret)
    log_printer = subprocess.Popen("tail -f " + lat_log, stdout=subprocess.PIPE,
                                   shell=True, universal_newlines=True)
    try:
        while log_printer.poll() is None:
            line = log_printer.stdout.readline()
            line = line.strip()
            if line:
                print(line, flush=True)
                if "ERROR: " in line:
                    say("info", "Failed to build image, check the log %s" % lat_log)
                    break
                if "DEBUG: Deploy ovmf.qcow2" in line:
                    say("info", "build-image successfully done, check the output in %s" % LAT_ROOT)
                    ret = 0
                    break
    finally:
        # build-image leaves its `tail -f` running; a test must not.
        log_printer.kill()
    stop_latd()

    deploy_dir = "%s/deploy" % LAT_ROOT
    write_manifest(deploy_dir)
    # build-image runs `sudo chown -R $USER: deploy`; a test's build user
    # has no sudo, so NO_CHOWN=1 leaves the step out.
    if os.environ.get("NO_CHOWN") != "1":
        subprocess.run('chown -R "$(id -un):" "%s"' % deploy_dir, shell=True, check=True)
    sys.exit(ret)


if __name__ == "__main__":
    main()
