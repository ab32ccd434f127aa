/**
 * The in-memory index: chunk id -> where its blob is. An open-addressing hash table (linear probing) on one
 * Buffer, because a JS Map stops at 16.7 M entries and costs ~100 bytes per entry. Slot layout
 * (docs/FORMAT.md § Index files): id bytes 0..19 | packNo u32 | offset u32 | storedLength u31 + zstd bit.
 */
export interface BlobLocation {
  packNo: number;
  offsetBytes: number;
  storedLength: number;
  compressed: boolean;
}

const slotBytes = 32;
const keyBytes = 20;
const emptyPack = 0xffffffff;
const maxLoad = 0.8;

export class ChunkIndex {
  #table: Buffer;
  #capacity: number;
  #count = 0;

  constructor(expectedEntries = 0) {
    // Size so that the expected entries fill the table to ~0.55: room to grow before the first resize.
    const capacity = Math.max(1024, Math.ceil(expectedEntries / 0.55));
    this.#table = ChunkIndex.#emptyTable(capacity);
    this.#capacity = capacity;
  }

  get size(): number {
    return this.#count;
  }

  /** Bytes of memory the table holds. */
  get memoryBytes(): number {
    return this.#table.length;
  }

  /** Adds an entry unless the id is already present (then the existing one stays, as any copy is valid). */
  add(id: Buffer, location: BlobLocation): boolean {
    if (this.#count + 1 > this.#capacity * maxLoad) this.#grow();
    const slot = this.#find(id);
    if (slot >= 0) return false;
    this.#write(-slot - 1, id, location);
    this.#count++;
    return true;
  }

  /** Adds or overwrites (used by gc when a blob moves to a new pack). */
  set(id: Buffer, location: BlobLocation): void {
    const slot = this.#find(id);
    if (slot >= 0) this.#write(slot, id, location);
    else this.add(id, location);
  }

  has(id: Buffer): boolean {
    return this.#find(id) >= 0;
  }

  get(id: Buffer): BlobLocation | undefined {
    const slot = this.#find(id);
    if (slot < 0) return undefined;
    const base = slot * slotBytes;
    const lengthAndFlag = this.#table.readUInt32LE(base + 28);
    return {
      packNo: this.#table.readUInt32LE(base + 20),
      offsetBytes: this.#table.readUInt32LE(base + 24),
      storedLength: lengthAndFlag & 0x7fffffff,
      compressed: (lengthAndFlag & 0x80000000) !== 0,
    };
  }

  /** Visits every entry; `idPrefix` is the stored 20-byte prefix (a view, copy it to keep it). */
  forEach(visit: (idPrefix: Buffer, location: BlobLocation) => void): void {
    for (let slot = 0; slot < this.#capacity; slot++) {
      const base = slot * slotBytes;
      if (this.#table.readUInt32LE(base + 20) === emptyPack) continue;
      const lengthAndFlag = this.#table.readUInt32LE(base + 28);
      visit(this.#table.subarray(base, base + keyBytes), {
        packNo: this.#table.readUInt32LE(base + 20),
        offsetBytes: this.#table.readUInt32LE(base + 24),
        storedLength: lengthAndFlag & 0x7fffffff,
        compressed: (lengthAndFlag & 0x80000000) !== 0,
      });
    }
  }

  /** Slot index if found, else -(free slot index) - 1. Ids are uniformly random: their first bytes hash. */
  #find(id: Buffer): number {
    const table = this.#table;
    const first = id.readUInt32LE(0);
    let slot = this.#home(first);
    for (;;) {
      const base = slot * slotBytes;
      if (table.readUInt32LE(base + 20) === emptyPack) return -slot - 1;
      if (table.readUInt32LE(base) === first && table.compare(id, 4, keyBytes, base + 4, base + keyBytes) === 0) return slot;
      if (++slot === this.#capacity) slot = 0;
    }
  }

  /** Multiply-shift instead of a mask, so the capacity need not be a power of two (1.5x growth). */
  #home(first: number): number {
    return Math.floor((first / 4294967296) * this.#capacity);
  }

  #write(slot: number, id: Buffer, location: BlobLocation): void {
    const base = slot * slotBytes;
    id.copy(this.#table, base, 0, keyBytes);
    this.#table.writeUInt32LE(location.packNo, base + 20);
    this.#table.writeUInt32LE(location.offsetBytes, base + 24);
    this.#table.writeUInt32LE((location.storedLength | (location.compressed ? 0x80000000 : 0)) >>> 0, base + 28);
  }

  /** Grows by 1.5x, keeping the load between ~0.53 and 0.8, i.e. 40-60 bytes per chunk. */
  #grow(): void {
    const old = this.#table;
    const oldCapacity = this.#capacity;
    this.#capacity = Math.ceil(oldCapacity * 1.5);
    this.#table = ChunkIndex.#emptyTable(this.#capacity);
    for (let slot = 0; slot < oldCapacity; slot++) {
      const base = slot * slotBytes;
      if (old.readUInt32LE(base + 20) === emptyPack) continue;
      let target = this.#home(old.readUInt32LE(base));
      while (this.#table.readUInt32LE(target * slotBytes + 20) !== emptyPack) if (++target === this.#capacity) target = 0;
      old.copy(this.#table, target * slotBytes, base, base + slotBytes);
    }
  }

  static #emptyTable(capacity: number): Buffer {
    const table = Buffer.alloc(capacity * slotBytes);
    for (let slot = 0; slot < capacity; slot++) table.writeUInt32LE(emptyPack, slot * slotBytes + 20);
    return table;
  }
}
