import { readFile, writeFile } from 'node:fs/promises';
import { HallmarkError } from '../../errors.js';
import { encodePem } from '../../pki/pem.js';
import { withAuthority, withStoreOnly } from '../context.js';
import { actor, flag, info, out, required, str, table, type Command } from '../io.js';

export const caListCommand: Command = {
  name: 'ca list',
  summary: 'the CA hierarchy with subjects, key ids, validity and status',
  usage: 'Usage: hallmark ca list [--home DIR] [--json]',
  options: { json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const cas = await ctx.listCas();
      if (flag(args, 'json')) { out(JSON.stringify(cas, null, 2)); return 0; }
      out(table(['NAME', 'ROLE', 'STATUS', 'PARENT', 'SUBJECT', 'KEY ID', 'ALGORITHM', 'NOT AFTER', 'KEY'],
        cas.map((c) => [c.name + (c.isDefaultIssuer ? ' *' : ''), c.role, c.status, c.parent ?? '-', c.subject, c.keyId.slice(0, 16) + '…', c.keyAlgorithm, c.notAfter?.slice(0, 10) ?? '-', c.keyLocation])));
      out('(* = default issuer)');
      return 0;
    });
  },
};

export const caExportCommand: Command = {
  name: 'ca export',
  summary: 'a CA certificate (or its chain up to the root) as PEM on stdout',
  usage: `Usage: hallmark ca export [--home DIR] [--name NAME] [--chain]

Without --name, exports the root certificate (the trust anchor to give other programs).
With --chain, the CA certificate followed by its issuers up to and including the root.`,
  options: { name: { type: 'string' }, chain: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const name = str(args, 'name') ?? (await ctx.rootName());
      const ders = await ctx.caChain(name, flag(args, 'chain'));
      out(ders.map((d) => encodePem('CERTIFICATE', d)).join(''));
      return 0;
    });
  },
};

export const caRequestCommand: Command = {
  name: 'ca request',
  summary: 'online side of the ceremony: new intermediate key + CSR for the offline root',
  usage: `Usage: hallmark ca request --name NAME [--home DIR] [--key-algorithm ALG] [--subject DN] [--out FILE]

Generates the new CA key in the configured key backend and writes its CSR (default:
<home>/requests/NAME.csr). Carry the CSR to the offline root: hallmark root sign --csr FILE.`,
  options: { name: { type: 'string' }, 'key-algorithm': { type: 'string' }, subject: { type: 'string' }, out: { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const name = required(args, 'name', this.usage);
    return withAuthority(args, async (authority) => {
      const { csrPem, path } = await authority.requestCa({ name, algorithm: str(args, 'key-algorithm'), subject: str(args, 'subject'), actor: actor() });
      const target = str(args, 'out');
      if (target) await writeFile(target, csrPem);
      info(`CA request for ${name} written to ${target ?? path}`);
      info(`Next, on the offline side: hallmark root sign --root-dir DIR --csr ${target ?? path} --out ${name}.pem`);
      return 0;
    });
  },
};

export const caInstallCommand: Command = {
  name: 'ca install',
  summary: 'online side of the ceremony: install the certificate the root signed',
  usage: 'Usage: hallmark ca install --cert FILE [--home DIR] [--default]\n\n--default makes the new CA the default issuer.',
  options: { cert: { type: 'string' }, default: { type: 'boolean' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const file = required(args, 'cert', this.usage);
    let pem: Buffer;
    try { pem = await readFile(file); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${file}`); }
    return withAuthority(args, async (authority) => {
      const ca = await authority.installCa({ certificate: pem, makeDefault: flag(args, 'default'), actor: actor() });
      out(`Installed ${ca.name}: ${ca.subject}, valid until ${ca.notAfter}${ca.isDefaultIssuer ? ' (default issuer)' : ''}`);
      return 0;
    });
  },
};
