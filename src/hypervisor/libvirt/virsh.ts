import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { childEnv } from '../../core/exec.ts';
import { SnapshiftError, type ErrorCode } from '../../core/errors.ts';
import { parseBackupXml, parseCheckpointXml, parseDomainXml, type LibvirtBackupJob, type LibvirtCheckpoint, type LibvirtDisk, type LibvirtDomainXml } from './libvirt-xml.ts';

/**
 * A thin, typed wrapper over `virsh -c URI …`: one method per command the libvirt adapter uses, run with an
 * argv (never a shell), XML outputs parsed, libvirt's error lines mapped to SnapshiftError codes.
 *
 * Why virsh and not libvirt's RPC protocol or a binding: the RPC protocol (XDR over the socket, with
 * keepalive, events and stream framing) is internal and versioned with the daemon, and would be ours to
 * maintain; the Node bindings on npm are unmaintained native addons (libvirt headers, node-gyp) on a stack
 * where Node 20 already rules out newer majors. virsh ships with every libvirt (libvirt-clients), speaks
 * every transport (qemu+unix, qemu+ssh, tls), runs each call in a process we can time out and end, its
 * commands are the ones an administrator types (so every error we print can be reproduced by hand), and
 * what we need from it is XML (dumpxml, checkpoint-dumpxml, backup-dumpxml). The cost is ~15-30 ms of
 * process start per call, noise next to snapshot, commit and backup times of 0.1-0.7 s.
 */
export interface VirshOptions {
  /** Default per-call timeout; default 120 s. Long waits (blockcommit --wait) take their own. */
  timeoutMs?: number;
  /** The virsh program; default `virsh` from PATH. */
  program?: string;
}

export interface CallOptions {
  timeoutMs?: number;
  /** Ends virsh (SIGTERM) when aborted. A job virsh was waiting for goes on in libvirt. */
  signal?: AbortSignal;
}

export type LibvirtDomainState = 'no-state' | 'running' | 'blocked' | 'paused' | 'shutdown' | 'shut-off' | 'crashed' | 'suspended';

/** virDomainState, as `domstats --state` numbers it. */
const domainStates: readonly LibvirtDomainState[] = ['no-state', 'running', 'blocked', 'paused', 'shutdown', 'shut-off', 'crashed', 'suspended'];

export interface LibvirtDomainSummary {
  name: string;
  uuid: string;
  state: LibvirtDomainState;
}

/** One row of `domblklist --details`. */
export interface LibvirtBlockListEntry {
  type: string;
  device: string;
  target: string;
  /** `-` in virsh's table (an empty CD-ROM) becomes undefined. */
  source: string | undefined;
}

/** One row set of `domblkinfo`, in bytes. */
export interface LibvirtBlockInfo {
  capacityBytes: number;
  allocationBytes: number | undefined;
  physicalBytes: number | undefined;
}

export interface DiskOverlaySpec {
  /** Disk target (`vda`). */
  disk: string;
  /** The new overlay file; libvirt creates it (qcow2, backed by the disk's current image). */
  overlayPath: string;
}

/** A block job as `blockjob --info --raw` and the domain XML show it. */
export interface LibvirtBlockJob {
  /** `Active Block Commit`, `Block Commit`, `Block Copy`, `Block Pull`. */
  type: string;
  curBytes: number;
  endBytes: number;
  bandwidthMiBps: number;
  /** The job may pivot now (`<mirror ready='yes'>`); only commit and copy jobs have it. */
  ready: boolean;
}

/** `domjobinfo`, the fields we use; `fields` has every line as printed. */
export interface LibvirtJobInfo {
  /** `None`, `Bounded`, `Unbounded`, `Completed`, `Failed`, `Cancelled`. */
  type: string;
  /** `Backup`, `Snapshot`, … (absent when there is no job). */
  operation: string | undefined;
  timeElapsedMs: number | undefined;
  /** Scratch space a pull backup used so far (copy-before-write), and the most it may use. */
  tempUsedBytes: number | undefined;
  tempTotalBytes: number | undefined;
  errorMessage: string | undefined;
  fields: Record<string, string>;
}

export class Virsh {
  readonly uri: string;
  readonly #timeoutMs: number;
  readonly #program: string;

  constructor(uri: string, options: VirshOptions = {}) {
    this.uri = uri;
    this.#timeoutMs = options.timeoutMs ?? 120_000;
    this.#program = options.program ?? 'virsh';
  }

  /** Runs `virsh -c URI ARGS…` and returns its stdout; a failure is a SnapshiftError coded from libvirt's message. */
  run(args: readonly string[], options: CallOptions = {}): Promise<string> {
    const argv = ['-c', this.uri, ...args];
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    return new Promise((resolve, reject) => {
      execFile(this.#program, argv, { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8', signal: options.signal, env: childEnv() }, (error, stdout, stderr) => {
        if (!error) return resolve(stdout);
        if (options.signal?.aborted) return reject(options.signal.reason as Error);
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
          return reject(new SnapshiftError('PROGRAM_MISSING', `${this.#program} is not installed (apt-get install libvirt-clients)`, { cause: error }));
        }
        const detail = libvirtErrorText(stderr) || (error.killed ? `no answer within ${timeoutMs} ms` : `exit status ${String(error.code)}, no message`);
        reject(new SnapshiftError(classifyLibvirtError(detail), `virsh ${args.slice(0, 2).join(' ')} on ${this.uri}: ${detail}`, { cause: error }));
      });
    });
  }

  /** Every domain (running or not), with its UUID and state. */
  async listDomains(options: CallOptions = {}): Promise<LibvirtDomainSummary[]> {
    // `list --uuid --name` prints "UUID NAME" (names may hold spaces); `domstats --state` gives each state by name.
    const listing = await this.run(['list', '--all', '--uuid', '--name'], options);
    const domains = listing.split('\n').filter((line) => line.trim() !== '').map((line) => {
      const match = /^([0-9a-f-]{36})\s(.+)$/.exec(line.trim());
      if (!match) throw new SnapshiftError('LIBVIRT_OUTPUT_UNPARSABLE', `virsh list printed "${line}", not "UUID NAME"`);
      return { uuid: match[1]!, name: match[2]! };
    });
    if (domains.length === 0) return [];
    const states = new Map<string, LibvirtDomainState>();
    let current: string | undefined;
    for (const line of (await this.run(['domstats', '--state', '--raw'], options)).split('\n')) {
      const domain = /^Domain: '(.*)'$/.exec(line.trim());
      if (domain) current = domain[1];
      const state = /^state\.state=(\d+)$/.exec(line.trim());
      if (state && current !== undefined) states.set(current, domainStates[Number(state[1])] ?? 'no-state');
    }
    return domains.map((domain) => ({ ...domain, state: states.get(domain.name) ?? 'no-state' }));
  }

  /**
   * The domain XML, live (with backing chains, block job mirrors, aliases) or `inactive` (the definition);
   * `migratable` leaves out what only this run of the domain has, so the text can be defined again elsewhere.
   */
  domainXml(domain: string, options: CallOptions & { inactive?: boolean; migratable?: boolean } = {}): Promise<string> {
    return this.run(['dumpxml', domain, ...(options.inactive ? ['--inactive'] : []), ...(options.migratable ? ['--migratable'] : [])], options);
  }

  /** `domblkinfo --bytes`: a disk's virtual size, the bytes allocated to it, and its image's physical size. */
  async blockInfo(domain: string, disk: string, options: CallOptions = {}): Promise<LibvirtBlockInfo> {
    const fields = new Map<string, number>();
    for (const line of (await this.run(['domblkinfo', domain, disk], options)).split('\n')) {
      const match = /^(\w+):\s+(\d+)$/.exec(line.trim());
      if (match) fields.set(match[1]!, Number(match[2]));
    }
    const capacity = fields.get('Capacity');
    if (capacity === undefined) throw new SnapshiftError('LIBVIRT_OUTPUT_UNPARSABLE', `virsh domblkinfo printed no Capacity for disk ${disk} of ${domain}`);
    return { capacityBytes: capacity, allocationBytes: fields.get('Allocation'), physicalBytes: fields.get('Physical') };
  }

  /** The domain's name, UUID and disks from its live XML. */
  async domain(domain: string, options: CallOptions & { inactive?: boolean } = {}): Promise<LibvirtDomainXml> {
    return parseDomainXml(await this.domainXml(domain, options));
  }

  /** The domain's disks (`device='disk'` and others) with path, format, driver, backing chain and any block job. */
  async disks(domain: string, options: CallOptions = {}): Promise<LibvirtDisk[]> {
    return (await this.domain(domain, options)).disks;
  }

  /** `domblklist --details`: type, device, target, source; the same facts as `disks`, in virsh's table. */
  async blockList(domain: string, options: CallOptions = {}): Promise<LibvirtBlockListEntry[]> {
    const lines = (await this.run(['domblklist', domain, '--details'], options)).split('\n');
    const rule = lines.findIndex((line) => /^-{5,}/.test(line.trim()));
    if (rule < 0) throw new SnapshiftError('LIBVIRT_OUTPUT_UNPARSABLE', `virsh domblklist printed no table for ${domain}`);
    return lines.slice(rule + 1).filter((line) => line.trim() !== '').map((line) => {
      const match = /^\s*(\S+)\s+(\S+)\s+(\S+)\s+(.+?)\s*$/.exec(line);
      if (!match) throw new SnapshiftError('LIBVIRT_OUTPUT_UNPARSABLE', `virsh domblklist printed "${line}"`);
      return { type: match[1]!, device: match[2]!, target: match[3]!, source: match[4] === '-' ? undefined : match[4] };
    });
  }

  /**
   * A disk-only external snapshot without libvirt metadata: each listed disk gets the overlay given
   * (`--diskspec DISK,snapshot=external,file=PATH`), every other disk `snapshot=no`; all or none (`--atomic`).
   * `quiesce` freezes the guest's file systems through the agent around it (fails without an agent).
   */
  async snapshotCreateDiskOnly(domain: string, spec: { overlays: readonly DiskOverlaySpec[]; excludedDisks?: readonly string[]; quiesce?: boolean; name?: string }, options: CallOptions = {}): Promise<void> {
    const args = ['snapshot-create-as', domain, '--disk-only', '--atomic', '--no-metadata'];
    if (spec.name) args.push('--name', spec.name);
    if (spec.quiesce) args.push('--quiesce');
    // virsh splits a diskspec on commas; a comma inside a value is written twice.
    for (const overlay of spec.overlays) args.push('--diskspec', `${overlay.disk},snapshot=external,file=${overlay.overlayPath.replaceAll(',', ',,')}`);
    for (const disk of spec.excludedDisks ?? []) args.push('--diskspec', `${disk},snapshot=no`);
    await this.run(args, options);
  }

  /**
   * Merges the active overlay of `disk` into its backing image and pivots the disk onto it
   * (`blockcommit --active --pivot --wait`). Refused with LIBVIRT_BLOCK_JOB_ACTIVE when a job already runs
   * on the disk (e.g. a commit whose waiter died): finish that one with `finishActiveCommit`.
   */
  async blockCommitActive(domain: string, disk: string, options: CallOptions & { bandwidthMiBps?: number; base?: string } = {}): Promise<void> {
    const args = ['blockcommit', domain, disk, '--active', '--pivot', '--wait'];
    // Without --base libvirt merges the whole chain into its bottom image (a template under the disk, too).
    if (options.base !== undefined) args.push('--base', options.base);
    if (options.bandwidthMiBps !== undefined) args.push('--bandwidth', String(options.bandwidthMiBps));
    await this.run(args, { timeoutMs: 30 * 60_000, ...options });
  }

  /** The block job on `disk`, or undefined when it has none. */
  async blockJob(domain: string, disk: string, options: CallOptions = {}): Promise<LibvirtBlockJob | undefined> {
    // --raw prints " type=…\n bandwidth=…\n cur=…\n end=…", nothing at all when there is no job.
    const raw = await this.run(['blockjob', domain, disk, '--info', '--raw'], options);
    const fields = new Map(raw.split('\n').map((line) => line.trim()).filter((line) => line.includes('=')).map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)] as const));
    const type = fields.get('type');
    if (type === undefined) return undefined;
    const mirror = (await this.disks(domain, options)).find((candidate) => candidate.target === disk)?.mirror;
    return { type, curBytes: Number(fields.get('cur') ?? 0), endBytes: Number(fields.get('end') ?? 0), bandwidthMiBps: Number(fields.get('bandwidth') ?? 0), ready: mirror?.ready ?? false };
  }

  /** Pivots a ready commit or copy job (`blockjob --pivot`): the disk continues on the job's target. */
  async blockJobPivot(domain: string, disk: string, options: CallOptions = {}): Promise<void> {
    await this.run(['blockjob', domain, disk, '--pivot'], options);
  }

  /** Cancels the disk's block job (`blockjob --abort`); an aborted active commit leaves the disk on its overlay. */
  async blockJobAbort(domain: string, disk: string, options: CallOptions = {}): Promise<void> {
    await this.run(['blockjob', domain, disk, '--abort'], options);
  }

  /** Changes a running block job's bandwidth limit; 0 lifts it. */
  async blockJobSetSpeed(domain: string, disk: string, bandwidthMiBps: number, options: CallOptions = {}): Promise<void> {
    await this.run(['blockjob', domain, disk, '--bandwidth', String(bandwidthMiBps)], options);
  }

  /**
   * Finishes an active commit someone else started (or a run that died left): lifts its bandwidth limit,
   * waits until it is ready, pivots. Returns false when the disk has no job.
   */
  async finishActiveCommit(domain: string, disk: string, options: CallOptions & { pollMs?: number } = {}): Promise<boolean> {
    const deadline = Date.now() + (options.timeoutMs ?? 30 * 60_000);
    let job = await this.blockJob(domain, disk, options);
    if (!job) return false;
    if (job.type !== 'Active Block Commit') throw new SnapshiftError('LIBVIRT_BLOCK_JOB_ACTIVE', `disk ${disk} of ${domain} runs a ${job.type} job, not an active commit; not touching it`);
    if (job.bandwidthMiBps !== 0) await this.blockJobSetSpeed(domain, disk, 0, options);
    while (!job.ready) {
      if (Date.now() > deadline) throw new SnapshiftError('LIBVIRT_COMMAND_FAILED', `the commit of ${disk} on ${domain} did not become ready in time (${job.curBytes} of ${job.endBytes} bytes)`);
      await new Promise((resolve) => setTimeout(resolve, options.pollMs ?? 200));
      options.signal?.throwIfAborted();
      const next = await this.blockJob(domain, disk, options);
      if (!next) throw new SnapshiftError('LIBVIRT_COMMAND_FAILED', `the commit job of ${disk} on ${domain} vanished before it was ready (cancelled?)`);
      job = next;
    }
    await this.blockJobPivot(domain, disk, options);
    return true;
  }

  /** Creates a checkpoint from its XML (`checkpoint-create FILE`); `redefine` only re-registers one whose bitmaps exist. */
  async checkpointCreate(domain: string, checkpointXml: string, options: CallOptions & { redefine?: boolean } = {}): Promise<void> {
    await withXmlFile(checkpointXml, (file) => this.run(['checkpoint-create', domain, file, ...(options.redefine ? ['--redefine'] : [])], options));
  }

  /** Checkpoint names, parents before children. */
  async checkpointNames(domain: string, options: CallOptions = {}): Promise<string[]> {
    const listing = await this.run(['checkpoint-list', domain, '--name', '--topological'], options);
    return listing.split('\n').map((line) => line.trim()).filter(Boolean);
  }

  /**
   * Deletes a checkpoint and its bitmaps (merged into its parent's). `metadataOnly` forgets it without
   * touching bitmaps: the only way out for a checkpoint whose bitmap is gone ("bitmap … not found").
   */
  async checkpointDelete(domain: string, name: string, options: CallOptions & { metadataOnly?: boolean; children?: boolean } = {}): Promise<void> {
    await this.run(['checkpoint-delete', domain, name, ...(options.metadataOnly ? ['--metadata'] : []), ...(options.children ? ['--children'] : [])], options);
  }

  /** The checkpoint's XML without the domain inside it: what `checkpointCreate(…, { redefine: true })` takes back. */
  checkpointDefinition(domain: string, name: string, options: CallOptions = {}): Promise<string> {
    return this.run(['checkpoint-dumpxml', domain, name, '--no-domain'], options);
  }

  /** A checkpoint; with `size`, per disk the bytes changed since it (libvirt sums its bitmap along the backing chain). */
  async checkpoint(domain: string, name: string, options: CallOptions & { size?: boolean } = {}): Promise<LibvirtCheckpoint> {
    return parseCheckpointXml(await this.run(['checkpoint-dumpxml', domain, name, '--no-domain', ...(options.size ? ['--size'] : [])], options));
  }

  /**
   * Starts a backup job from its XML, and atomically a checkpoint when `checkpointXml` is given. Pull mode
   * returns once the NBD server listens. Without `reuseExternal` libvirt creates each scratch file (and
   * refuses one that exists) and deletes it when the job ends; with it, the files are the caller's.
   */
  async backupBegin(domain: string, backupXml: string, options: CallOptions & { checkpointXml?: string; reuseExternal?: boolean } = {}): Promise<void> {
    await withXmlFile(backupXml, (backupFile) =>
      options.checkpointXml === undefined
        ? this.run(['backup-begin', domain, backupFile, ...(options.reuseExternal ? ['--reuse-external'] : [])], options)
        : withXmlFile(options.checkpointXml, (checkpointFile) => this.run(['backup-begin', domain, backupFile, checkpointFile, ...(options.reuseExternal ? ['--reuse-external'] : [])], options)),
    );
  }

  /** The running backup job (export names, bitmaps, socket), or undefined when there is none. */
  async backupJob(domain: string, options: CallOptions = {}): Promise<LibvirtBackupJob | undefined> {
    try {
      return parseBackupXml(await this.run(['backup-dumpxml', domain], options));
    } catch (error) {
      if (error instanceof SnapshiftError && error.code === 'LIBVIRT_NO_JOB') return undefined;
      throw error;
    }
  }

  /** `domjobinfo` (or `--completed`: the last finished job, e.g. an aborted backup's scratch use). */
  async jobInfo(domain: string, options: CallOptions & { completed?: boolean } = {}): Promise<LibvirtJobInfo> {
    const text = await this.run(['domjobinfo', domain, ...(options.completed ? ['--completed'] : [])], options);
    const fields: Record<string, string> = {};
    for (const line of text.split('\n')) {
      const at = line.indexOf(':');
      if (at > 0) fields[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    const type = fields['Job type'];
    if (type === undefined) throw new SnapshiftError('LIBVIRT_OUTPUT_UNPARSABLE', `virsh domjobinfo printed no "Job type" for ${domain}`);
    const elapsed = /^(\d+)\s*ms$/.exec(fields['Time elapsed'] ?? '');
    return {
      type,
      operation: fields['Operation'],
      timeElapsedMs: elapsed ? Number(elapsed[1]) : undefined,
      tempUsedBytes: parseVirshSize(fields['Temporary disk space use']),
      tempTotalBytes: parseVirshSize(fields['Temporary disk space total']),
      errorMessage: fields['Error message'],
      fields,
    };
  }

  /**
   * Aborts the domain's job (`domjobabort`); for a backup, waits until libvirt has ended it (it returns
   * before that, and removes its scratch files ~0.1-0.5 s later), so a next backup-begin finds no leftovers.
   */
  async jobAbort(domain: string, options: CallOptions & { waitMs?: number } = {}): Promise<void> {
    const backup = await this.backupJob(domain, options);
    await this.run(['domjobabort', domain], options);
    if (!backup) return;
    const waitMs = options.waitMs ?? 30_000;
    const deadline = Date.now() + waitMs;
    while ((await this.backupJob(domain, options)) !== undefined) {
      if (Date.now() > deadline) throw new SnapshiftError('LIBVIRT_COMMAND_FAILED', `the backup job of ${domain} did not end within ${waitMs} ms of domjobabort`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    // libvirt deletes the scratch files it made right after; with --reuse-external they stay (the caller's).
    const scratchPaths = backup.disks.flatMap((disk) => (disk.scratchPath ? [disk.scratchPath] : []));
    const scratchDeadline = Date.now() + 2000;
    while (Date.now() < scratchDeadline && (await Promise.all(scratchPaths.map((file) => fs.access(file).then(() => true, () => false)))).some(Boolean)) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** Sends a guest agent command (`qemu-agent-command`) and returns its `return` value. */
  async agentCommand<T = unknown>(domain: string, command: string, args?: Record<string, unknown>, options: CallOptions & { agentTimeoutS?: number } = {}): Promise<T> {
    const request = JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args });
    const output = await this.run(['qemu-agent-command', domain, request, '--timeout', String(options.agentTimeoutS ?? 5)], options);
    try {
      return (JSON.parse(output) as { return: T }).return;
    } catch (error) {
      throw new SnapshiftError('LIBVIRT_OUTPUT_UNPARSABLE', `the guest agent of ${domain} answered ${command} with "${output.trim().slice(0, 200)}"`, { cause: error });
    }
  }

  /** True when the guest agent answers `guest-ping`; false when it is absent or not connected. */
  async agentPing(domain: string, options: CallOptions = {}): Promise<boolean> {
    try {
      await this.agentCommand(domain, 'guest-ping', undefined, options);
      return true;
    } catch (error) {
      if (error instanceof SnapshiftError && error.code === 'LIBVIRT_AGENT_UNAVAILABLE') return false;
      throw error;
    }
  }

  /** Freezes the guest's file systems through the agent; returns how many it froze. */
  async fsFreeze(domain: string, options: CallOptions = {}): Promise<number> {
    return countFrom(await this.run(['domfsfreeze', domain], options), /Froze (\d+) filesystem/, 'domfsfreeze');
  }

  /** Thaws them; returns how many it thawed. */
  async fsThaw(domain: string, options: CallOptions = {}): Promise<number> {
    return countFrom(await this.run(['domfsthaw', domain], options), /Thawed (\d+) filesystem/, 'domfsthaw');
  }

  /** Ends a domain at once (`destroy`); a transient one is gone afterwards. */
  async destroy(domain: string, options: CallOptions = {}): Promise<void> {
    await this.run(['destroy', domain], options);
  }
}

/** libvirt's error lines from virsh's stderr ("error: …"), joined; the last line otherwise. */
function libvirtErrorText(stderr: string): string {
  const lines = stderr.split('\n').map((line) => line.trim()).filter(Boolean);
  const errors = lines.filter((line) => line.startsWith('error: ')).map((line) => line.slice('error: '.length));
  return (errors.length > 0 ? errors : lines.slice(-1)).join('; ');
}

/** Codes for the libvirt messages snapshift acts on (libvirt 9.0 wording; anything else is LIBVIRT_COMMAND_FAILED). */
export function classifyLibvirtError(message: string): ErrorCode {
  const rules: Array<[RegExp, ErrorCode]> = [
    [/failed to connect to the hypervisor|Failed to connect socket/i, 'LIBVIRT_CONNECT_FAILED'],
    [/failed to get domain|Domain not found/i, 'LIBVIRT_DOMAIN_UNKNOWN'],
    [/not ready for pivot/i, 'LIBVIRT_COMMAND_FAILED'],
    [/already in active block job|block copy still active|in use by block job|has an active block job/i, 'LIBVIRT_BLOCK_JOB_ACTIVE'],
    [/no domain backup job present|no job is active|no current block job/i, 'LIBVIRT_NO_JOB'],
    [/checkpoint inconsistent|missing or broken bitmap/i, 'LIBVIRT_CHECKPOINT_INCONSISTENT'],
    [/no domain checkpoint with matching name/i, 'LIBVIRT_CHECKPOINT_UNKNOWN'],
    [/store '.*' for backup of '.*' exists/i, 'LIBVIRT_BACKUP_SCRATCH_EXISTS'],
    [/guest agent is not (connected|responding|configured)|agent is not responding|agent not available/i, 'LIBVIRT_AGENT_UNAVAILABLE'],
  ];
  return rules.find(([pattern]) => pattern.test(message))?.[1] ?? 'LIBVIRT_COMMAND_FAILED';
}

/** virsh's human sizes ("9.938 MiB", "128.000 KiB", "0.000 B") in bytes, rounded. */
export function parseVirshSize(value: string | undefined): number | undefined {
  const match = /^([\d.]+)\s*(B|KiB|MiB|GiB|TiB)$/.exec(value?.trim() ?? '');
  if (!match) return undefined;
  const scale = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4 }[match[2] as 'B' | 'KiB' | 'MiB' | 'GiB' | 'TiB'];
  return Math.round(Number(match[1]) * scale);
}

function countFrom(output: string, pattern: RegExp, command: string): number {
  const match = pattern.exec(output);
  if (!match) throw new SnapshiftError('LIBVIRT_OUTPUT_UNPARSABLE', `virsh ${command} printed "${output.trim()}"`);
  return Number(match[1]);
}

/** virsh takes XML documents as files: a private temp file for the call, removed after. */
async function withXmlFile<T>(xml: string, use: (file: string) => Promise<T>): Promise<T> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'snapshift-virsh-'));
  try {
    const file = path.join(dir, 'document.xml');
    await fs.writeFile(file, xml, { mode: 0o600 });
    return await use(file);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}
