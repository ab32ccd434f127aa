import { constants, existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { messageOf } from '../core/errors.ts';
import { exec } from '../core/exec.ts';
import { chooseAccelerator } from '../lab/qemu-guest.ts';
import { probeMissingPath, type Probe } from './check.ts';

/** What the probes look at that a test may want to change. */
export interface ProbeEnvironment {
  /** Folders searched for programs, in order: the PATH that snapshift's own exec calls will see. */
  searchPath: readonly string[];
}

export function probeEnvironmentOfProcess(): ProbeEnvironment {
  return { searchPath: (process.env['PATH'] ?? '').split(':').filter((dir) => dir !== '') };
}

export interface ProbeOutcome {
  found: boolean;
  /** Where it was found, or why it counts as missing. */
  detail: string;
}

type ProbeOf<K extends Probe['kind']> = Extract<Probe, { kind: K }>;
interface Prober<K extends Probe['kind']> {
  /** What the check is about, for people. */
  label(probe: ProbeOf<K>): string;
  run(probe: ProbeOf<K>, environment: ProbeEnvironment): Promise<ProbeOutcome>;
}

/** Folders a root shell usually has on PATH; a program there but not on PATH is reported as such. */
const sbinFolders = ['/usr/local/sbin', '/usr/sbin', '/sbin'];

/** How long a driver probe may take; it answers in about 0.1 s, the rest is for a loaded machine. */
const driverProbeTimeoutMs = 30_000;

/** The file-system kernel modules' folder of the running kernel. */
const kernelFsModules = (name: string) => path.join('/lib/modules', os.release(), 'kernel', 'fs', name);

/** One prober per kind of probe; `runProbe` and `labelOf` dispatch on the kind. */
const probers: { [K in Probe['kind']]: Prober<K> } = {
  program: {
    label: ({ program }) => program,
    run: async ({ program }, environment) => {
      const found = await findProgram(program, environment.searchPath);
      if (found) return { found: true, detail: found };
      const elsewhere = await findProgram(program, sbinFolders.filter((dir) => !environment.searchPath.includes(dir)));
      if (elsewhere) return { found: false, detail: `installed at ${elsewhere}, but its folder is not on PATH (snapshift runs programs from PATH)` };
      return { found: false, detail: 'not found on PATH' };
    },
  },

  /*
   * Whether this host's QEMU can open block nodes with `driver`. `qemu-img --help` proves nothing: it lists every
   * driver QEMU was built with, also those built as modules (Debian: rbd, iscsi, curl, nfs, ssh, gluster, in
   * qemu-block-extra) whose module is not installed. The module file alone proves little more: QEMU refuses a
   * module of another build or one whose libraries are missing, and looks for modules beside its own binary.
   * So we ask qemu-storage-daemon, the program that opens these images for us, to open a node that cannot open:
   * QEMU looks the driver up (loading its module) before it opens anything, and answers "Unknown driver 'X'"
   * only when that lookup failed. Past it, the driver's own open fails on the path we gave (a missing file for
   * qcow2/raw, a missing Ceph config for rbd, so nothing reaches a network), and an error naming that path proves
   * the driver ran. Measured on Debian 12 (QEMU 7.2), 0.1 s each: without qemu-block-extra "Unknown driver
   * 'rbd'" (after "module block-block-rbd not found"); with it "error reading conf file /nonexistent/…".
   * QEMU is relocatable: it searches <its binary>/../lib/x86_64-linux-gnu/qemu, so a copy of qemu-storage-daemon
   * in another folder sees no modules (test/cli/doctor.test.ts shows a missing driver that way).
   */
  'qemu-block-driver': {
    label: ({ driver }) => `QEMU block driver ${driver}`,
    run: async ({ driver, blockdev, moduleName }, environment) => {
      const daemon = await findProgram('qemu-storage-daemon', environment.searchPath);
      if (!daemon) return { found: false, detail: 'cannot probe: qemu-storage-daemon is not on PATH (qemu-system-common)' };
      const options = JSON.stringify(blockdev);
      let answer: string;
      try {
        await exec(daemon, ['--blockdev', options], { timeoutMs: driverProbeTimeoutMs });
        answer = 'qemu-storage-daemon accepted a node that cannot open';
      } catch (error) {
        answer = messageOf(error);
      }
      // Its last line is "qemu-storage-daemon: --blockdev <options>: <error>". Only the error counts: the options
      // echoed before it name our path too, so without that prefix (a timeout, a crash) nothing is proven.
      const pieces = answer.split(`${options}: `);
      const reason = pieces.length > 1 ? pieces.at(-1)!.trim() : undefined;
      if (reason === undefined) return { found: false, detail: `probe inconclusive: ${answer}` };
      if (reason.includes(probeMissingPath)) return { found: true, detail: `${daemon} opens it (probe: "${reason}")` };
      if (reason.includes(`Unknown driver '${driver}'`)) {
        let module = '';
        if (moduleName !== undefined) {
          const folder = path.join(path.dirname(await fs.realpath(daemon)), '..', 'lib', 'x86_64-linux-gnu', 'qemu');
          module = existsSync(path.join(folder, moduleName))
            ? `; ${moduleName} is in ${folder} but QEMU did not load it (another QEMU build? libraries missing?)`
            : `; no ${moduleName} in ${path.normalize(folder)}, where it looks`;
        }
        return { found: false, detail: `${daemon}: Unknown driver '${driver}'${module}` };
      }
      if (reason.includes(`does not accept value '${driver}'`)) return { found: false, detail: `this QEMU was built without the ${driver} driver` };
      return { found: false, detail: `probe inconclusive: ${reason}` };
    },
  },

  device: {
    label: ({ path: device }) => device,
    // Opened, not just looked at: a container's device rules refuse the open even to root.
    run: async ({ path: device }) => {
      try {
        const handle = await fs.open(device, constants.O_RDWR);
        await handle.close();
        return { found: true, detail: 'opens read-write' };
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        return { found: false, detail: code === 'ENOENT' ? 'does not exist' : `cannot be opened read-write (${code ?? messageOf(error)})` };
      }
    },
  },

  file: {
    label: ({ path: file }) => file,
    run: async ({ path: file }) => (existsSync(file) ? { found: true, detail: 'present' } : { found: false, detail: 'does not exist' }),
  },

  kvm: {
    label: () => '/dev/kvm (KVM)',
    // The lab's own choice (chooseAccelerator), so doctor says what a lab guest will really use.
    run: async () => {
      if (chooseAccelerator() === 'kvm') return { found: true, detail: '/dev/kvm usable: lab guests run under KVM' };
      const why = existsSync('/sys/module/kvm_pvm')
        ? 'KVM here is the PVM nested module (kvm_pvm), under which guests hang'
        : existsSync('/dev/kvm')
          ? '/dev/kvm is not writable'
          : '/dev/kvm does not exist';
      return { found: false, detail: why };
    },
  },

  filesystem: {
    label: ({ name }) => `${name} filesystem (kernel)`,
    run: async ({ name }) => {
      const registered = (await fs.readFile('/proc/filesystems', 'utf8')).split('\n').map((line) => line.trim().split(/\s+/).at(-1));
      if (registered.includes(name)) return { found: true, detail: 'in the running kernel (/proc/filesystems)' };
      for (const suffix of ['.ko', '.ko.xz', '.ko.zst', '.ko.gz']) {
        const module = path.join(kernelFsModules(name), `${name}${suffix}`);
        if (existsSync(module)) return { found: true, detail: `loadable: ${module} (mounting loads it)` };
      }
      return { found: false, detail: `not in /proc/filesystems, and no module in ${kernelFsModules(name)}` };
    },
  },

  'node-version': {
    label: ({ minimum }) => `Node.js >= ${minimum}`,
    run: async ({ minimum }) => {
      const found = compareVersions(process.versions.node, minimum) >= 0;
      return { found, detail: `Node.js ${process.versions.node} at ${process.execPath}${found ? '' : ` (older than ${minimum})`}` };
    },
  },

  root: {
    label: () => 'running as root',
    run: async () => {
      const uid = process.getuid?.();
      return uid === 0 ? { found: true, detail: 'uid 0' } : { found: false, detail: `uid ${uid ?? 'unknown'}` };
    },
  },
};

/** The prober of `probe`'s kind (TypeScript cannot correlate the kind with the map's entry by itself). */
function proberOf(probe: Probe): Prober<Probe['kind']> {
  return probers[probe.kind] as unknown as Prober<Probe['kind']>;
}

export function runProbe(probe: Probe, environment: ProbeEnvironment): Promise<ProbeOutcome> {
  return proberOf(probe).run(probe, environment);
}

/** What a check is about, for people: `qemu-img`, `QEMU block driver rbd`, `/dev/fuse`, … */
export function labelOf(probe: Probe): string {
  return proberOf(probe).label(probe);
}

/** The first executable file named `program` in `folders`, as execFile would find it. */
async function findProgram(program: string, folders: readonly string[]): Promise<string | undefined> {
  for (const folder of folders) {
    const candidate = path.join(folder, program);
    try {
      await fs.access(candidate, constants.X_OK);
      if ((await fs.stat(candidate)).isFile()) return candidate;
    } catch {
      // not in this folder
    }
  }
  return undefined;
}

function compareVersions(actual: string, minimum: string): number {
  const a = actual.split('.').map(Number);
  const b = minimum.split('.').map(Number);
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    const difference = (a[i] ?? 0) - (b[i] ?? 0);
    if (difference !== 0) return difference;
  }
  return 0;
}
