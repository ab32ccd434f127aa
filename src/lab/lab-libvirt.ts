import { closeSync, openSync, promises as fs } from 'node:fs';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { exec } from '../core/exec.ts';
import { SnapshiftError, messageOf } from '../core/errors.ts';
import { pathExists } from '../core/fs-probe.ts';
import type { ProcessRecord } from './lab-state.ts';
import { endOwnedProcess, isOwnedProcessAlive, readCmdline, sleep } from './owned-process.ts';

/**
 * The lab's own libvirtd (with its virtlogd), isolated from any system libvirt.
 *
 * Why a privileged daemon in its own mount namespace (measured on libvirt 9.0, Debian 12, as root):
 * - A session daemon is not possible as root: libvirtd decides "privileged" from geteuid() alone (its
 *   --help lists /run/libvirt/libvirt-sock whatever XDG_* and HOME say), and `virsh -c qemu:///session`
 *   run as root connects to /var/run/libvirt/libvirt-sock. A session daemon under another user could not
 *   run QEMU as root (seclabel +0:+0), nor read root's images.
 * - A privileged daemon with its own `unix_sock_dir` and `-p` pid file isolates only its client socket.
 *   Its drivers still use the compiled-in /run/libvirt/{qemu,network,…}/driver.pid locks (a second one
 *   next to a system libvirtd fails), /var/lib/libvirt/qemu (checkpoint metadata, monitor sockets),
 *   /etc/libvirt (it rewrote the packaged default network and nwfilter files on first start), and
 *   virtlogd's socket is fixed at /run/libvirt/virtlogd-sock.
 * - So: the same privileged daemon, but started in a private mount namespace (`unshare --mount
 *   --propagation private`) where /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
 *   /var/cache/libvirt are bind mounts of folders under the lab's folder. Nothing of it lands in the
 *   host's libvirt folders, it runs beside a system libvirtd, it reads our qemu.conf (QEMU as root, no
 *   cgroups, no per-domain /dev namespace), and the mounts vanish with the namespace's last process.
 *   Its client socket is <dir>/run/libvirt-sock: `qemu+unix:///system?socket=<dir>/run/libvirt-sock`.
 *
 * One consequence: mounts made on the host after start do not appear in the namespace (the host's /
 * is private here, nothing propagates). Mount the datastores before `start`, unmount them after `stop`.
 */
export interface LabLibvirtOptions {
  /** Folder for config, sockets, state and logs; made if missing. Keep it short: unix socket paths stop at 107 bytes. */
  dir: string;
  /** How long to wait for the daemon's socket; default 30 s (the first start of a machine may take ~12 s). */
  readyTimeoutMs?: number;
}

export interface LabLibvirtStopReport {
  /** PIDs ended: domains' QEMUs left running, libvirtd, virtlogd. */
  endedPids: number[];
  /** Domains destroyed through libvirt before the daemon went down. */
  destroyedDomains: string[];
}

/** Host folders the namespace hides behind folders of our own (<dir>/<key>). */
const boundFolders = { etc: '/etc/libvirt', run: '/run/libvirt', lib: '/var/lib/libvirt', log: '/var/log/libvirt', cache: '/var/cache/libvirt' } as const;
type BoundFolder = keyof typeof boundFolders;

/** What `start` made, written before each thing is made, so `stopIn(dir)` can undo it after a crash. */
interface LabLibvirtState {
  version: 1;
  /** `mnt:[inode]` of the namespace: any process still in it is ours. */
  mountNamespace?: string;
  processes: ProcessRecord[];
}

const stateFileName = 'lab-libvirt.json';
const libvirtdLabel = 'libvirtd';
const virtlogdLabel = 'virtlogd';
const holderLabel = 'namespace-holder';

export class LabLibvirt implements AsyncDisposable {
  readonly dir: string;
  /** The client socket (outside and inside the namespace alike). */
  readonly socketPath: string;
  /** The connection URI for virsh and the adapter. */
  readonly uri: string;
  readonly libvirtdPid: number;
  readonly virtlogdPid: number;
  /** From spawning libvirtd to its socket answering. */
  readonly startMs: number;

  private constructor(dir: string, libvirtdPid: number, virtlogdPid: number, startMs: number) {
    this.dir = dir;
    this.socketPath = libvirtSocketPath(dir);
    this.uri = libvirtUri(dir);
    this.libvirtdPid = libvirtdPid;
    this.virtlogdPid = virtlogdPid;
    this.startMs = startMs;
  }

  /**
   * Starts virtlogd and libvirtd in a new mount namespace and waits until virsh gets an answer. A failure
   * half-way undoes what was made. Needs root and util-linux's unshare/nsenter.
   */
  static async start(options: LabLibvirtOptions): Promise<LabLibvirt> {
    const dir = path.resolve(options.dir);
    if (libvirtSocketPath(dir).length > 107) throw new SnapshiftError('BAD_ARGUMENT', `lab libvirt folder ${dir} is too long for a unix socket path (use a shorter one)`);
    if (process.getuid?.() !== 0) throw new SnapshiftError('LAB_HOST_UNFIT', 'the lab libvirtd needs root (a privileged daemon in its own mount namespace)');
    const libvirtd = await findProgram('libvirtd', 'libvirt-daemon-system');
    const virtlogd = await findProgram('virtlogd', 'libvirt-daemon-system');
    const statePath = path.join(dir, stateFileName);
    if (await pathExists(statePath)) throw new SnapshiftError('LAB_BROKEN', `a lab libvirtd was started in ${dir} and not stopped; stop it first (LabLibvirt.stopIn)`);
    await fs.mkdir(dir, { recursive: true });
    for (const folder of Object.keys(boundFolders) as BoundFolder[]) await fs.mkdir(path.join(dir, folder), { recursive: true });
    await writeConfig(dir);
    const state: LabLibvirtState = { version: 1, processes: [] };
    await writeState(dir, state);
    const started = Date.now();
    try {
      const holderArgs = ['sleep', 'infinity'];
      const holder = await spawnDetached('unshare', ['--mount', '--propagation', 'private', '--', ...holderArgs], path.join(dir, 'log', 'namespace.out'), holderArgs);
      state.processes.push(holder(holderLabel));
      await writeState(dir, state);
      const holderRecord = state.processes[0]!;
      await waitForCmdline(holderRecord, 5000);
      state.mountNamespace = await fs.readlink(`/proc/${holderRecord.pid}/ns/mnt`);
      await writeState(dir, state);
      const inNamespace = ['--target', String(holderRecord.pid), '--mount', '--'];
      for (const [folder, target] of Object.entries(boundFolders)) {
        // The mount point must exist on the host (it does once libvirt is installed, except /run/libvirt).
        await fs.mkdir(target, { recursive: true });
        await exec('nsenter', [...inNamespace, 'mount', '--bind', path.join(dir, folder), target], { code: 'LAB_LIBVIRT_FAILED' });
      }
      const virtlogdArgs = [virtlogd, '-f', path.join(dir, 'etc', 'virtlogd.conf'), '-p', path.join(dir, 'run', 'virtlogd.pid')];
      state.processes.push((await spawnDetached('nsenter', [...inNamespace, ...virtlogdArgs], path.join(dir, 'log', 'virtlogd.out'), virtlogdArgs))(virtlogdLabel));
      await writeState(dir, state);
      const libvirtdArgs = [libvirtd, '-f', path.join(dir, 'etc', 'libvirtd.conf'), '-p', path.join(dir, 'run', 'libvirtd.pid')];
      state.processes.push((await spawnDetached('nsenter', [...inNamespace, ...libvirtdArgs], path.join(dir, 'log', 'libvirtd.out'), libvirtdArgs))(libvirtdLabel));
      await writeState(dir, state);
      const virtlogdRecord = state.processes[1]!;
      const libvirtdRecord = state.processes[2]!;
      await waitForCmdline(virtlogdRecord, 5000);
      await waitForCmdline(libvirtdRecord, 5000);
      // Both daemons now hold the namespace: the holder may go.
      await endOwnedProcess(holderRecord, { graceMs: 1000 });
      state.processes = state.processes.filter((p) => p.label !== holderLabel);
      await writeState(dir, state);
      await waitForAnswer(dir, libvirtdRecord, options.readyTimeoutMs ?? 30_000);
      return new LabLibvirt(dir, libvirtdRecord.pid, virtlogdRecord.pid, Date.now() - started);
    } catch (error) {
      try {
        await LabLibvirt.stopIn(dir);
      } catch (cleanupError) {
        throw new SnapshiftError('LAB_LIBVIRT_FAILED', `lab libvirtd start failed (${messageOf(error)}) and cleaning up failed too (${messageOf(cleanupError)})`, { cause: error });
      }
      throw error;
    }
  }

  /**
   * Stops the lab libvirtd in `dir` from its state file alone (also after the starter crashed): destroys
   * every domain it runs, ends libvirtd and virtlogd, kills any process still in its namespace (a QEMU
   * whose libvirtd had died), and removes everything it made in `dir`. Idempotent.
   */
  static async stopIn(dir: string): Promise<LabLibvirtStopReport> {
    dir = path.resolve(dir);
    const report: LabLibvirtStopReport = { endedPids: [], destroyedDomains: [] };
    const state = await readState(dir);
    let destroyFailure: unknown;
    if (state) {
      const libvirtd = state.processes.find((p) => p.label === libvirtdLabel);
      // Without its socket the daemon never served a client (it died or was stopped while starting): it runs
      // no domain, and virsh could not reach it anyway.
      if (libvirtd && (await isOwnedProcessAlive(libvirtd)) && (await pathExists(libvirtSocketPath(dir)))) {
        // A domain libvirt would not destroy still dies with the namespace below: the daemons are ended anyway.
        try {
          report.destroyedDomains.push(...(await destroyAllDomains(dir)));
        } catch (error) {
          destroyFailure = error;
        }
      }
      for (const label of [libvirtdLabel, virtlogdLabel, holderLabel]) {
        const record = state.processes.find((p) => p.label === label);
        if (record && (await endOwnedProcess(record, { graceMs: 5000 }))) report.endedPids.push(record.pid);
      }
      if (state.mountNamespace) report.endedPids.push(...(await killNamespace(state.mountNamespace)));
    }
    // Only what start made: the bound folders (sockets, pid files, domain state, logs), config and state.
    for (const folder of Object.keys(boundFolders)) await fs.rm(path.join(dir, folder), { recursive: true, force: true });
    await fs.rm(path.join(dir, stateFileName), { force: true });
    await fs.rmdir(dir).catch(() => undefined);
    if (destroyFailure !== undefined) {
      throw new SnapshiftError('LAB_LIBVIRT_FAILED', `the lab libvirtd in ${dir} is stopped, but destroying its domains through it failed first (their QEMUs were killed with the namespace): ${messageOf(destroyFailure)}`, { cause: destroyFailure });
    }
    return report;
  }

  /** `stopIn(this.dir)`. */
  stop(): Promise<LabLibvirtStopReport> {
    return LabLibvirt.stopIn(this.dir);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }

  /** Where the daemon keeps a domain's checkpoint metadata (host path of /var/lib/libvirt/qemu/checkpoint/<domain>). */
  checkpointMetadataDir(domainName: string): string {
    return path.join(this.dir, 'lib', 'qemu', 'checkpoint', domainName);
  }

  /** Where a persistent domain's definition lives (host path of /etc/libvirt/qemu/<domain>.xml). */
  persistentDefinitionPath(domainName: string): string {
    return path.join(this.dir, 'etc', 'qemu', `${domainName}.xml`);
  }

  /** libvirtd's own log (warnings and errors), for failure messages. */
  get logPath(): string {
    return path.join(this.dir, 'log', 'libvirtd.log');
  }
}

export function libvirtSocketPath(dir: string): string {
  return path.join(path.resolve(dir), 'run', 'libvirt-sock');
}

export function libvirtUri(dir: string): string {
  return `qemu+unix:///system?socket=${libvirtSocketPath(dir)}`;
}

async function writeConfig(dir: string): Promise<void> {
  const quote = (value: string): string => JSON.stringify(value); // libvirt's conf strings take C escapes, as JSON's
  const files: Record<string, string[]> = {
    // No auth on the socket: it lives in a root-only folder of the lab.
    'libvirtd.conf': [`unix_sock_dir = ${quote(path.join(dir, 'run'))}`, 'unix_sock_rw_perms = "0700"', 'auth_unix_rw = "none"', 'auth_unix_ro = "none"', `log_outputs = ${quote(`3:file:${path.join(dir, 'log', 'libvirtd.log')}`)}`],
    'virtlogd.conf': [`log_outputs = ${quote(`3:file:${path.join(dir, 'log', 'virtlogd.log')}`)}`],
    // QEMU as root on images we own; no cgroups (a container's may be read-only) and no private /dev per
    // domain, which need more than this machine gives; nothing relabelled, nothing remembered in xattrs.
    'qemu.conf': ['user = "root"', 'group = "root"', 'dynamic_ownership = 0', 'remember_owner = 0', 'security_driver = "none"', 'cgroup_controllers = [ ]', 'namespaces = [ ]'],
  };
  for (const [name, lines] of Object.entries(files)) await fs.writeFile(path.join(dir, 'etc', name), `${lines.join('\n')}\n`);
}

async function findProgram(name: string, debianPackage: string): Promise<string> {
  for (const folder of ['/usr/sbin', '/usr/bin', '/sbin', '/bin']) {
    const candidate = path.join(folder, name);
    if (await pathExists(candidate)) return candidate;
  }
  throw new SnapshiftError('PROGRAM_MISSING', `${name} is not installed (apt-get install ${debianPackage})`);
}

/**
 * Starts a program detached (its own session, output to `logPath`) and returns a maker of its record.
 * `finalCmdline` is what /proc shows once unshare or nsenter has exec'd the program (without --fork they exec).
 */
async function spawnDetached(program: string, args: string[], logPath: string, finalCmdline?: string[]): Promise<(label: string) => ProcessRecord> {
  const log = openSync(logPath, 'a');
  try {
    const child = spawn(program, args, { detached: true, stdio: ['ignore', log, log] });
    const pid = await new Promise<number>((resolve, reject) => {
      child.once('spawn', () => resolve(child.pid!));
      child.once('error', (error) => reject(new SnapshiftError('PROGRAM_MISSING', `cannot start ${program} (${error.message}); it comes with util-linux`, { cause: error })));
    });
    child.unref();
    const startedAt = new Date().toISOString();
    return (label) => ({ label, pid, cmdline: finalCmdline ?? [program, ...args], startedAt });
  } finally {
    closeSync(log);
  }
}

async function waitForCmdline(record: ProcessRecord, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await isOwnedProcessAlive(record))) {
    const now = await readCmdline(record.pid);
    // An empty cmdline is also what /proc shows for a moment inside execve (nsenter becoming libvirtd, slow
    // on a cold page cache): only a process that is gone (or a zombie) has exited.
    const exited = now === undefined && (await hasExited(record.pid));
    if (exited || Date.now() > deadline) {
      throw new SnapshiftError('LAB_LIBVIRT_FAILED', `${record.label} (pid ${record.pid}) ${exited ? 'exited at start' : now === undefined ? 'did not finish starting' : `runs as "${now.join(' ')}", not as started`}`);
    }
    await sleep(20);
  }
}

/** True when `pid` no longer runs: no /proc entry, or a zombie waiting to be reaped. */
async function hasExited(pid: number): Promise<boolean> {
  try {
    const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
}

async function waitForAnswer(dir: string, libvirtd: ProcessRecord, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await pathExists(libvirtSocketPath(dir))) {
      try {
        await exec('virsh', ['-c', libvirtUri(dir), 'version', '--daemon'], { timeoutMs: Math.max(1000, deadline - Date.now()) });
        return;
      } catch (error) {
        if (Date.now() > deadline) throw new SnapshiftError('LAB_LIBVIRT_FAILED', `lab libvirtd did not answer within ${timeoutMs} ms: ${messageOf(error)}`, { cause: error });
      }
    }
    if (!(await isOwnedProcessAlive(libvirtd))) {
      const log = await fs.readFile(path.join(dir, 'log', 'libvirtd.out'), 'utf8').catch(() => '');
      throw new SnapshiftError('LAB_LIBVIRT_FAILED', `lab libvirtd exited at start: ${log.trim().split('\n').at(-1) ?? 'no message'}`);
    }
    if (Date.now() > deadline) throw new SnapshiftError('LAB_LIBVIRT_FAILED', `lab libvirtd made no socket within ${timeoutMs} ms`);
    await sleep(50);
  }
}

/** Destroys every running domain and undefines every persistent one (with its checkpoint and snapshot metadata). */
async function destroyAllDomains(dir: string): Promise<string[]> {
  const virsh = (args: string[]) => exec('virsh', ['-q', '-c', libvirtUri(dir), ...args], { timeoutMs: 60_000, code: 'LAB_LIBVIRT_FAILED' });
  const running = (await virsh(['list', '--name'])).stdout.split('\n').map((line) => line.trim()).filter(Boolean);
  for (const name of running) await virsh(['destroy', name]);
  const persistent = (await virsh(['list', '--all', '--persistent', '--name'])).stdout.split('\n').map((line) => line.trim()).filter(Boolean);
  for (const name of persistent) await virsh(['undefine', name, '--checkpoints-metadata', '--snapshots-metadata', '--nvram']);
  return running;
}

/** SIGKILLs every process left in the namespace (by PID, found through /proc/PID/ns/mnt); returns their PIDs. */
async function killNamespace(mountNamespace: string): Promise<number[]> {
  const killed: number[] = [];
  for (let round = 0; round < 50; round++) {
    const members: number[] = [];
    for (const entry of await fs.readdir('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      const link = await fs.readlink(`/proc/${entry}/ns/mnt`).catch(() => undefined);
      if (link === mountNamespace) members.push(Number(entry));
    }
    if (members.length === 0) return killed;
    for (const pid of members) {
      try {
        process.kill(pid, 'SIGKILL');
        if (!killed.includes(pid)) killed.push(pid);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error;
      }
    }
    await sleep(100);
  }
  throw new SnapshiftError('LAB_LIBVIRT_FAILED', `processes of the lab libvirt namespace ${mountNamespace} did not end after SIGKILL`);
}

async function readState(dir: string): Promise<LabLibvirtState | undefined> {
  let text: string;
  try {
    text = await fs.readFile(path.join(dir, stateFileName), 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
  try {
    const value = JSON.parse(text) as LabLibvirtState;
    if (value.version !== 1 || !Array.isArray(value.processes)) throw new Error('unknown layout');
    return value;
  } catch (error) {
    throw new SnapshiftError('LAB_STATE_BAD', `lab libvirt state ${path.join(dir, stateFileName)} is unreadable (${messageOf(error)})`, { cause: error });
  }
}

async function writeState(dir: string, state: LabLibvirtState): Promise<void> {
  const file = path.join(dir, stateFileName);
  const temp = `${file}.${process.pid}.tmp`;
  await fs.writeFile(temp, `${JSON.stringify(state, null, 2)}\n`);
  await fs.rename(temp, file);
}
