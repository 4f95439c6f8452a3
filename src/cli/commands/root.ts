import { readFile, writeFile } from 'node:fs/promises';
import { HallmarkError } from '../../errors.js';
import { OfflineRoot } from '../../authority/offline-root.js';
import { encodePem } from '../../pki/pem.js';
import { info, intOption, list, out, readPassphrase, required, str, type Command } from '../io.js';

export const rootSignCommand: Command = {
  name: 'root sign',
  summary: 'offline side of the ceremony: sign an intermediate CA request with the root key',
  usage: `Usage: hallmark root sign --root-dir DIR --csr FILE [--path-len 0] [--days N] [--permit-dns DOMAIN]... [--out FILE]

Needs only the root directory (and its passphrase: --passphrase-file, HALLMARK_ROOT_PASSPHRASE or
HALLMARK_PASSPHRASE). The certificate is appended to the root's journal (issued.jsonl) before it is
written. --permit-dns adds critical name constraints.`,
  options: { 'root-dir': { type: 'string' }, csr: { type: 'string' }, 'path-len': { type: 'string' }, days: { type: 'string' }, 'permit-dns': { type: 'string', multiple: true }, out: { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const rootDir = required(args, 'root-dir', this.usage);
    const csrFile = required(args, 'csr', this.usage);
    let csr: Buffer;
    try { csr = await readFile(csrFile); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${csrFile}`); }
    const passphrase = await readPassphrase(args, { envVar: 'HALLMARK_ROOT_PASSPHRASE', prompt: 'Root passphrase: ' });
    const root = await OfflineRoot.open(rootDir, passphrase);
    try {
      const signed = await root.signIntermediate({ csr, pathLen: intOption(args, 'path-len') ?? 0, validityDays: intOption(args, 'days'), permittedDns: list(args, 'permit-dns') });
      const pem = encodePem('CERTIFICATE', signed.der);
      const target = str(args, 'out');
      if (target) { await writeFile(target, pem); info(`Signed ${signed.subject} (serial ${signed.serial}) -> ${target}`); } else { info(`Signed ${signed.subject} (serial ${signed.serial})`); out(pem); }
      return 0;
    } finally {
      await root.close();
    }
  },
};
