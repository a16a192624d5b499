// Vendored copy of a third-party Parser.
function Parser(text) {
  this.text = text;
}
module.exports = Parser;
