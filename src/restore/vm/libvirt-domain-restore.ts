import { XMLBuilder, XMLParser } from 'fast-xml-parser';
import { join } from 'node:path';
import { SnapshiftError } from '../../core/errors.ts';
import { randomMac } from './qemu-launch.ts';

/** A node of fast-xml-parser's order-preserving tree: `{ tag: children, ':@': { '@attr': value } }`. */
type OrderedNode = Record<string, unknown> & { ':@'?: Record<string, string> };

const options = { ignoreAttributes: false, attributeNamePrefix: '@', preserveOrder: true, commentPropName: '#comment', suppressEmptyNode: true } as const;

export interface DomainRestoreSpec {
  name: string;
  /** The new UUID, or undefined to keep the captured one (a VM restored in place of a lost original). */
  uuid: string | undefined;
  /** New MAC addresses for every interface (beside the original) or the captured ones. */
  newMacs: boolean;
  /** Restored disk images by target dev (vda, …). */
  disks: ReadonlyMap<string, { path: string; format: 'qcow2' | 'raw' }>;
  /** Folder for what the domain writes by path (serial log files, unix sockets): never the original's. */
  folder: string;
}

/**
 * The captured domain XML made into the restored domain's: its name, UUID, disk images (the restored ones,
 * with no backing chain), MAC addresses, and every serial/console/channel path moved into the VM's folder
 * so it never writes to the original's files. Everything else is kept as libvirt gave it.
 */
export function restoredDomainXml(capturedXml: string, spec: DomainRestoreSpec): { xml: string; macs: string[] } {
  const tree = new XMLParser(options).parse(capturedXml) as OrderedNode[];
  const domain = tree.find((node) => 'domain' in node);
  if (!domain) throw new SnapshiftError('RESTORE_NO_CONFIGURATION', 'the captured domain XML has no <domain> element');
  const children = domain.domain as OrderedNode[];
  setText(children, 'name', spec.name);
  if (spec.uuid) setText(children, 'uuid', spec.uuid);
  const devices = (children.find((node) => 'devices' in node)?.devices ?? []) as OrderedNode[];
  const macs: string[] = [];
  let pathIndex = 0;
  for (const device of devices) {
    const [tag] = Object.keys(device).filter((key) => key !== ':@');
    const inner = device[tag!] as OrderedNode[];
    if (tag === 'disk') {
      if (device[':@']?.['@device'] !== undefined && device[':@']['@device'] !== 'disk') continue;
      const target = inner.find((node) => 'target' in node)?.[':@']?.['@dev'];
      const restored = target ? spec.disks.get(target) : undefined;
      if (!restored) continue;
      device[':@'] = { ...device[':@'], '@type': 'file' };
      removeAll(inner, 'backingStore');
      removeAll(inner, 'source');
      inner.splice(0, 0, { source: [], ':@': { '@file': restored.path } });
      const driver = inner.find((node) => 'driver' in node);
      if (driver) driver[':@'] = { ...driver[':@'], '@type': restored.format };
      else inner.push({ driver: [], ':@': { '@name': 'qemu', '@type': restored.format } });
    } else if (tag === 'interface') {
      const mac = inner.find((node) => 'mac' in node);
      const address = spec.newMacs || !mac?.[':@']?.['@address'] ? randomMac() : mac[':@']['@address'];
      if (mac) mac[':@'] = { ...mac[':@'], '@address': address };
      else inner.push({ mac: [], ':@': { '@address': address } });
      macs.push(address);
    } else if (tag === 'serial' || tag === 'console' || tag === 'channel' || tag === 'parallel') {
      for (const source of inner.filter((node) => 'source' in node)) {
        const path = source[':@']?.['@path'];
        if (!path) continue;
        const kind = device[':@']?.['@type'] === 'unix' ? 'sock' : 'log';
        source[':@'] = { ...source[':@'], '@path': join(spec.folder, `${tag}${pathIndex++}.${kind}`) };
      }
    }
  }
  return { xml: `${new XMLBuilder({ ...options, format: true, indentBy: '  ' }).build(tree) as string}`, macs };
}

function setText(children: OrderedNode[], tag: string, value: string): void {
  const node = children.find((candidate) => tag in candidate);
  if (node) node[tag] = [{ '#text': value }];
  else children.unshift({ [tag]: [{ '#text': value }] });
}

function removeAll(children: OrderedNode[], tag: string): void {
  for (let index = children.length - 1; index >= 0; index--) if (tag in children[index]!) children.splice(index, 1);
}
