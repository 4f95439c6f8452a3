import { readFile, writeFile } from 'node:fs/promises';
import { HallmarkError } from '../../errors.js';
import { encodePem } from '../../pki/pem.js';
import { withAuthority } from '../context.js';
import { actor, flag, info, intOption, list, out, required, str, type Command } from '../io.js';

export const issueCommand: Command = {
  name: 'issue',
  summary: 'issue one certificate from a CSR (operator path)',
  usage: `Usage: hallmark issue --csr FILE [--profile device|tls-server|ocsp-signer] [--ca NAME] [--subject DN]
                      [--dns NAME]... [--ip ADDR]... [--uri URI]... [--days N] [--chain] [--out FILE]

The certificate's subject is --subject when given, otherwise the CSR's subject as you approve it;
extensions come only from the profile (extension requests in the CSR are ignored). The certificate
is recorded and audited before it is written. --chain appends the issuing chain (without the root).`,
  options: {
    csr: { type: 'string' }, profile: { type: 'string' }, ca: { type: 'string' }, subject: { type: 'string' },
    dns: { type: 'string', multiple: true }, ip: { type: 'string', multiple: true }, uri: { type: 'string', multiple: true },
    days: { type: 'string' }, chain: { type: 'boolean' }, out: { type: 'string' }, 'passphrase-file': { type: 'string' },
  },
  async run(args) {
    const file = required(args, 'csr', this.usage);
    let csr: Buffer;
    try { csr = await readFile(file); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${file}`); }
    return withAuthority(args, async (authority) => {
      const cert = await authority.issue({
        csr, profile: str(args, 'profile'), ca: str(args, 'ca'), subject: str(args, 'subject'),
        altNames: { dns: list(args, 'dns'), ip: list(args, 'ip'), uri: list(args, 'uri') }, validityDays: intOption(args, 'days'), actor: actor(),
      });
      const pem = [cert.der, ...(flag(args, 'chain') ? cert.chain.slice(0, -1) : [])].map((d) => encodePem('CERTIFICATE', d)).join('');
      const target = str(args, 'out');
      if (target) await writeFile(target, pem); else out(pem);
      info(`Issued ${cert.profile} certificate ${cert.serial} for ${cert.subject} by ${cert.issuer}, valid until ${cert.notAfter.toISOString()}`);
      return 0;
    });
  },
};
