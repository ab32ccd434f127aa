/**
 * What `snapshift doctor` checks, as data: each check names what it probes, the Debian package (or the host
 * remedy) that brings it, which features need it and what stops working without it.
 */

/** The features a check can be needed by; `requiredBy` turns a `--for` choice into the set that must pass. */
export const features = {
  engine: { description: 'engine core: backup, restore and hunt, in both processing modes', includes: [] },
  btrfs: { description: 'the btrfs storage provider', includes: ['engine'] },
  xfs: { description: 'the XFS (reflink) storage provider', includes: ['engine'] },
  zfs: { description: 'the ZFS storage provider', includes: ['engine'] },
  'ceph-rbd': { description: 'the Ceph RBD storage provider', includes: ['engine'] },
  libvirt: { description: 'the libvirt hypervisor adapter (host add libvirt)', includes: ['engine'] },
  lab: { description: "the lab's btrfs/XFS datastores and guests (lab up, npm run demo)", includes: ['engine', 'btrfs', 'xfs'] },
  'lab-zfs': { description: "the lab's ZFS datastore (lab zfs up)", includes: ['lab', 'zfs'] },
  'lab-ceph': { description: "the lab's single-node Ceph", includes: ['lab', 'ceph-rbd'] },
  'lab-libvirt': { description: "the lab's own libvirtd and its domains", includes: ['lab', 'libvirt'] },
  files: { description: 'file-level restore (snapshift files): FUSE, loop devices, read-only mounts', includes: ['engine'] },
  tests: { description: 'the test suite (npm test)', includes: ['lab', 'lab-zfs', 'lab-ceph', 'lab-libvirt', 'files'] },
  bench: { description: 'the benchmarks (npm run bench)', includes: ['lab'] },
} as const satisfies Record<string, { description: string; includes: readonly string[] }>;

export type Feature = keyof typeof features;

export function isFeature(name: string): name is Feature {
  return Object.hasOwn(features, name);
}

/** Every feature `wanted` needs, itself included (e.g. tests → tests, lab, engine, btrfs, …). */
export function requiredBy(wanted: readonly Feature[]): Set<Feature> {
  const required = new Set<Feature>();
  const visit = (feature: Feature): void => {
    if (required.has(feature)) return;
    required.add(feature);
    for (const included of features[feature].includes) visit(included);
  };
  for (const feature of wanted) visit(feature);
  return required;
}

/** A path that never exists: driver probes open it so that the open fails after the driver lookup. */
export const probeMissingPath = '/nonexistent/snapshift-doctor-probe';

/** How a check finds out; each kind has one prober in `probes.ts`. */
export type Probe =
  | { kind: 'program'; program: string }
  | {
      kind: 'qemu-block-driver';
      driver: string;
      /** A block node that must fail to open once the driver is found, on a path in `probeMissingPath`. */
      blockdev: Record<string, unknown>;
      /** The driver's module file, when it is one (`block-rbd.so`); reported, not decisive. */
      moduleName?: string;
    }
  | { kind: 'device'; path: string }
  /** A plugin file that no program names (libvirtd's QEMU driver): present or not. */
  | { kind: 'file'; path: string }
  | { kind: 'kvm' }
  | { kind: 'filesystem'; name: string }
  | { kind: 'node-version'; minimum: string }
  | { kind: 'root' };

export interface Check {
  /** Stable, for --json consumers: `program:qemu-img`, `qemu-block-driver:rbd`, `device:/dev/fuse`, … */
  readonly id: string;
  readonly probe: Probe;
  /** The Debian package that brings it (scripts/setup.sh installs every one named here). */
  readonly debianPackage?: string;
  /** What to do where no package brings it (kernel support, devices, Node.js, root). */
  readonly remedy?: string;
  readonly neededBy: readonly Feature[];
  /** What stops working without it, in a user's words. */
  readonly withoutIt: string;
  /** Set when something else takes over without it: then it is never required, only reported. */
  readonly fallback?: string;
}

export interface CheckResult {
  id: string;
  /** What was checked, for people: `qemu-img`, `QEMU block driver rbd`, `/dev/kvm`, … */
  label: string;
  found: boolean;
  /** Needed by a feature asked for (`--for`), and without a fallback. */
  required: boolean;
  neededBy: Feature[];
  debianPackage: string | null;
  remedy: string | null;
  withoutIt: string;
  fallback: string | null;
  /** Where it was found, or why it counts as missing. */
  detail: string;
}

export interface DoctorReport {
  /** The features asked for; `requiredFeatures` adds what they include. */
  for: Feature[];
  requiredFeatures: Feature[];
  /** Every required check found. */
  ok: boolean;
  checks: CheckResult[];
}
