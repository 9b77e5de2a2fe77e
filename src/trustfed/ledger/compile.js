// Compile trustfed's ledger contracts with solcjs (npm `solc`, pinned in package.json) into the
// committed artifacts that ship in the Python package.
//   node src/trustfed/ledger/compile.js            write artifacts/<Name>.json
//   node src/trustfed/ledger/compile.js --stdout   print them as one JSON object (for the staleness test)
'use strict';
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const here = __dirname;
const srcDir = path.join(here, 'contracts');
const outDir = path.join(here, 'artifacts');
const names = fs.readdirSync(srcDir).filter((f) => f.endsWith('.sol')).sort();
const sources = {};
for (const f of names) sources[f] = { content: fs.readFileSync(path.join(srcDir, f), 'utf8') };

const input = {
  language: 'Solidity',
  sources,
  settings: {
    evmVersion: 'prague',
    optimizer: { enabled: true, runs: 200 },
    metadata: { bytecodeHash: 'none' },
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
  },
};
const out = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (out.errors || []).filter((e) => e.severity === 'error');
if (errors.length) {
  for (const e of errors) console.error(e.formattedMessage);
  process.exit(1);
}
const artifacts = {};
for (const f of names) {
  for (const [name, c] of Object.entries(out.contracts[f])) {
    artifacts[name] = {
      contract: name,
      source: 'contracts/' + f,
      compiler: 'solcjs ' + solc.version(),
      evmVersion: input.settings.evmVersion,
      optimizer: input.settings.optimizer,
      abi: c.abi,
      bytecode: '0x' + c.evm.bytecode.object,
    };
  }
}
if (process.argv.includes('--stdout')) {
  process.stdout.write(JSON.stringify(artifacts));
} else {
  fs.mkdirSync(outDir, { recursive: true });
  for (const [name, a] of Object.entries(artifacts)) {
    fs.writeFileSync(path.join(outDir, name + '.json'), JSON.stringify(a, null, 1) + '\n');
  }
  console.error('wrote ' + Object.keys(artifacts).length + ' artifacts to ' + outDir);
}
