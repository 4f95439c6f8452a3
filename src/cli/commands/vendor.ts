import { readFile } from 'node:fs/promises';
import { HallmarkError } from '../../errors.js';
import { addVendorCa, listVendorCas } from '../../registry/birth-certificates.js';
import { withStoreOnly } from '../context.js';
import { actor, flag, out, required, table, type Command } from '../io.js';

export const vendorAddCommand: Command = {
  name: 'vendor add',
  summary: 'trust a silicon vendor CA for birth certificates',
  usage: 'Usage: hallmark vendor add NAME --ca FILE [--home DIR]\n\nFILE holds one or more PEM CA certificates (the vendor root, and signer CAs if wanted).',
  allowPositionals: true,
  options: { ca: { type: 'string' } },
  async run(args) {
    const name = args.positionals[0];
    if (!name) throw new HallmarkError('BAD_REQUEST', `give the vendor name\n${this.usage}`);
    const file = required(args, 'ca', this.usage);
    let pem: string;
    try { pem = await readFile(file, 'utf8'); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${file}`); }
    return withStoreOnly(args, async (ctx) => {
      const added = await addVendorCa(ctx.store, { vendor: name, pem, actor: actor() });
      out(`Vendor ${name}: ${added} CA certificate(s) added`);
      return 0;
    });
  },
};

export const vendorListCommand: Command = {
  name: 'vendor list',
  summary: 'the vendor trust store',
  usage: 'Usage: hallmark vendor list [--json] [--home DIR]',
  options: { json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const cas = await listVendorCas(ctx.store.db);
      out(flag(args, 'json') ? JSON.stringify(cas, null, 2) : table(['VENDOR', 'SUBJECT', 'NOT AFTER', 'SHA-256'], cas.map((c) => [c.vendor, c.subject, c.notAfter.slice(0, 10), c.fingerprintSha256.slice(0, 16) + '…'])));
      return 0;
    });
  },
};
